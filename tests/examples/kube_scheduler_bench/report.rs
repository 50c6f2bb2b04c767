//! The parent: runs every (workload, system) pair as a child, prints the table.

use crate::GPUS;
use crate::RESULT_PREFIX;
use crate::args::{Args, System, Variant};
use crate::jobs::workload;
use anyhow::{Context as _, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

pub(crate) fn run_child(
    args: &[String],
    system: System,
    variant: Variant,
) -> anyhow::Result<Value> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(args)
        .args(["--run", system.arg(), "--variant", variant.arg()])
        // The child exits when this pipe closes, so it never outlives this process.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a benchmark child")?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        match line.strip_prefix(RESULT_PREFIX) {
            Some(r) => result = Some(serde_json::from_str::<Value>(r)?),
            None => println!("{line}"),
        }
    }
    let status = child.wait()?;
    match result {
        Some(r) if status.success() => Ok(r),
        _ => bail!("the {} run of {} failed ({status})", variant.arg(), system.title()),
    }
}

pub(crate) fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

pub(crate) fn print_table(args: &Args, rows: &[(Variant, System, Value)]) {
    let (jobs_mixed, jobs_single) =
        (workload(args, Variant::Mixed), workload(args, Variant::Single));
    println!();
    println!(
        "fleet: {} nodes × {GPUS} GPUs = {} GPUs; workloads fill {:.0}% of it; seed {}; {} creates in flight",
        args.nodes,
        args.nodes * GPUS as usize,
        args.fill * 100.0,
        args.seed,
        args.concurrency
    );
    for (variant, jobs) in [(Variant::Mixed, &jobs_mixed), (Variant::Single, &jobs_single)] {
        let mut sizes: BTreeMap<(u32, u32), usize> = BTreeMap::new();
        for j in jobs.iter() {
            *sizes.entry((j.workers * j.gpus, j.workers)).or_default() += 1;
        }
        let classes = |lo: u32, hi: u32| -> usize {
            sizes.iter().filter(|((g, _), _)| *g >= lo && *g <= hi).map(|(_, n)| n).sum()
        };
        println!(
            "{:>6}: {} jobs (1 GPU: {}, 2–8: {}, 9–64: {}, 65+: {}), {} workers/Pods, {} GPUs",
            variant.arg(),
            jobs.len(),
            classes(1, 1),
            classes(2, 8),
            classes(9, 64),
            classes(65, u32::MAX),
            jobs.iter().map(|j| j.workers).sum::<u32>(),
            jobs.iter().map(|j| j.workers * j.gpus).sum::<u32>()
        );
    }
    println!();
    println!(
        "{:<7} {:<15} {:>6} {:>7} {:>6} {:>8} {:>9} {:>9} {:>10} {:>8} {:>10} {:>11} {:>9}",
        "work",
        "scheduler",
        "jobs",
        "pods/wk",
        "GPUs",
        "submit s",
        "placed s",
        "jobs/s",
        "pods|wk/s",
        "unplaced",
        "partial pk",
        "partial end",
        "stranded"
    );
    for (variant, system, v) in rows {
        let placed_s = f(v, "last_placed_s");
        let unplaced = n(v, "workers").saturating_sub(n(v, "placed_workers"));
        println!(
            "{:<7} {:<15} {:>6} {:>7} {:>6} {:>8.2} {:>9.2} {:>9.1} {:>10.1} {:>8} {:>10} {:>11} {:>9}",
            variant.arg(),
            system.title(),
            n(v, "jobs"),
            n(v, "workers"),
            n(v, "placed_gpus"),
            f(v, "submitted_s"),
            placed_s,
            f(v, "placed_jobs") / placed_s,
            f(v, "placed_workers") / placed_s,
            unplaced,
            n(v, "peak_partial"),
            n(v, "partial_end"),
            n(v, "stranded_gpus"),
        );
    }
    println!();
    for variant in [Variant::Mixed, Variant::Single] {
        let find = |s: System| rows.iter().find(|(v, sys, _)| *v == variant && *sys == s);
        if let (Some((_, _, k)), Some((_, _, fl))) = (find(System::Kube), find(System::Flotilla)) {
            let (tk, tf) = (f(k, "last_placed_s"), f(fl, "last_placed_s"));
            let complete = |v: &Value| v["placed_workers"] == v["workers"];
            println!(
                "{}: time to the last placement, Flotilla / kube-scheduler = {:.2} / {:.2} s = {:.2}× ({}){}",
                variant.arg(),
                tf,
                tk,
                tf / tk,
                if tf <= tk { "Flotilla faster" } else { "kube-scheduler faster" },
                match (complete(k), complete(fl)) {
                    (true, true) => String::new(),
                    (a, b) => format!(
                        "; not everything placed: kube-scheduler {}, Flotilla {}",
                        if a { "complete" } else { "incomplete" },
                        if b { "complete" } else { "incomplete" }
                    ),
                }
            );
            if let Some(running) = fl["last_running_s"].as_f64() {
                println!(
                    "{}: Flotilla, every job's workers reported started by the synthetic agents: {:.2} s",
                    variant.arg(),
                    running
                );
            }
        }
    }
    for (variant, system, v) in rows {
        println!(
            "check before {} ({}): {} 8-GPU jobs, one per node, placed and deleted in {:.1} s",
            variant.arg(),
            system.title(),
            args.nodes,
            f(v, "check_placed_s")
        );
    }
}
