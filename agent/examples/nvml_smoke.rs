//! NVML smoke run: the agent's NVML backend against whatever `libnvidia-ml.so.1` the loader finds
//! (the real driver on a GPU node; the stand-in under `scripts/gpu-smoke.sh --mock`). Prints the
//! inventory, the event loop's registrations (log lines), one line per GPU per second of samples,
//! and every event, then a verdict. Exits non-zero when NVML does not start, the inventory is
//! empty, or a round of samples missed a GPU.
//!
//! Run: `scripts/gpu-smoke.sh [seconds]`, or
//! `cargo run -p flotilla-agent --example nvml_smoke -- [seconds]` (default 60).

use flotilla_agent::backend::GpuBackend;
use flotilla_agent::backend::nvml::NvmlBackend;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(60);
    tracing_subscriber::fmt().with_env_filter("info").with_target(false).init();
    let node = std::env::var("HOSTNAME").unwrap_or_else(|_| "smoke".to_owned());
    let started = Instant::now();
    let backend = NvmlBackend::new(&node)?;
    println!("== NVML started in {:?}", started.elapsed());

    let inventory = backend.inventory()?;
    println!("== inventory: {} GPUs", inventory.len());
    for gpu in &inventory {
        println!("{}", serde_json::to_string(gpu)?);
    }
    anyhow::ensure!(!inventory.is_empty(), "NVML reports no GPUs");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    backend.watch_events(tx)?;
    // The event thread logs one "NVML events registered" line per GPU before it waits.
    std::thread::sleep(Duration::from_secs(2));

    println!("== samples: {seconds} s at 1 Hz");
    println!(
        "t gpu temp_c mem_temp_c power_w util_pct mem_used_mib sm_mhz ecc_sbe ecc_dbe \
         remap_cor/unc/fail nvlink_crc/replay/recovery throttle"
    );
    let mut short_rounds = 0;
    let mut events = 0;
    let mut slowest = Duration::ZERO;
    for t in 0..seconds {
        let round = Instant::now();
        let samples = backend.sample()?;
        slowest = slowest.max(round.elapsed());
        if samples.len() != inventory.len() {
            short_rounds += 1;
        }
        for s in &samples {
            println!(
                "{t} {} {:.0} {:.0} {:.1} {:.0} {} {} {} {} {}/{}/{} {}/{}/{} {:#x}",
                s.index,
                s.temperature_c,
                s.memory_temperature_c,
                s.power_w,
                s.gpu_util_pct,
                s.memory_used_bytes >> 20,
                s.sm_clock_mhz,
                s.ecc_corrected_volatile,
                s.ecc_uncorrected_volatile,
                s.remapped_rows_correctable,
                s.remapped_rows_uncorrectable,
                u8::from(s.row_remap_failure),
                s.nvlink_errors.crc_flit + s.nvlink_errors.crc_data,
                s.nvlink_errors.replay,
                s.nvlink_errors.recovery,
                s.throttle_reasons,
            );
        }
        while let Ok(event) = rx.try_recv() {
            events += 1;
            println!("{t} EVENT gpu {} {:?}", event.index, event.fault);
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(round.elapsed()));
    }
    for gpu in &inventory {
        let passed = backend.validate(gpu.index)?;
        println!("== validate gpu {}: {}", gpu.index, if passed { "passed" } else { "FAILED" });
    }
    println!(
        "== {seconds} rounds, {short_rounds} missing a GPU, slowest round {slowest:?}, {events} events"
    );
    anyhow::ensure!(short_rounds == 0, "{short_rounds} sample rounds missed a GPU");
    Ok(())
}
