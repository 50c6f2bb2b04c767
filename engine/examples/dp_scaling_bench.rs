//! Data-parallel scaling on loopback: 1, 2 and 4 ranks (threads, real TCP ring), global tokens/s
//! and all-reduce time per step (prints figures).
//!
//! `cargo run --release -p flotilla-engine --example dp_scaling_bench [-- STEPS]`

use std::net::TcpListener;
use std::time::Duration;

use flotilla_engine::collective::{GroupSpec, Ring};
use flotilla_engine::config::EngineConfig;
use flotilla_engine::train::Trainer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let config = EngineConfig::preset("tiny").ok_or("tiny")?;
    println!(
        "tiny preset, {} sequences × {} tokens per rank per step",
        config.training.batch_size, config.training.seq_len
    );
    for world in [1usize, 2, 4] {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let master = listener.local_addr()?.to_string();
        let mut listener = Some(listener);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let config = config.clone();
                let master = master.clone();
                let lead = listener.take().filter(|_| rank == 0);
                std::thread::spawn(move || -> Result<(f64, f64, f64), String> {
                    let spec = GroupSpec { rank, world, timeout: Duration::from_secs(60) };
                    let ring = match (world, lead) {
                        (1, _) => Ring::single(),
                        (_, Some(l)) => Ring::lead(spec, l).map_err(|e| e.to_string())?,
                        (_, None) => Ring::connect(spec, &master).map_err(|e| e.to_string())?,
                    };
                    let mut trainer =
                        Trainer::new(config, ring, None, 0).map_err(|e| e.to_string())?;
                    let (mut tokens, mut seconds, mut reduce) = (0.0, 0.0, 0.0);
                    for step in 0..steps {
                        let r = trainer.train_step(false).map_err(|e| e.to_string())?;
                        if step >= 3 {
                            tokens += r.tokens as f64;
                            seconds += r.seconds;
                            reduce += r.allreduce_seconds;
                        }
                    }
                    Ok((tokens, seconds, reduce))
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "rank panicked"))
            .collect::<Result<_, _>>()?;
        let (tokens, seconds, reduce) = results[0].clone()?;
        let measured = (steps - 3) as f64;
        println!(
            "world {world}: {:.0} global tokens/s, step {:.1} ms, all-reduce {:.2} ms/step",
            tokens / seconds,
            seconds / measured * 1e3,
            reduce / measured * 1e3
        );
    }
    Ok(())
}
