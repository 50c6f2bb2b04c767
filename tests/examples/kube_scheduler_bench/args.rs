//! Command-line arguments: which systems and workloads to run, and their sizes.

use anyhow::{Context as _, bail};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum System {
    Kube,
    Flotilla,
}

impl System {
    pub(crate) fn arg(self) -> &'static str {
        match self {
            System::Kube => "kube",
            System::Flotilla => "flotilla",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            System::Kube => "kube-scheduler",
            System::Flotilla => "Flotilla",
        }
    }

    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "kube" => Ok(System::Kube),
            "flotilla" => Ok(System::Flotilla),
            other => bail!("expected kube or flotilla, got {other:?}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    Mixed,
    Single,
}

impl Variant {
    pub(crate) fn arg(self) -> &'static str {
        match self {
            Variant::Mixed => "mixed",
            Variant::Single => "single",
        }
    }

    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "mixed" => Ok(Variant::Mixed),
            "single" => Ok(Variant::Single),
            other => bail!("expected mixed or single, got {other:?}"),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Args {
    /// Nodes in the fleet (8 GPUs each).
    pub(crate) nodes: usize,
    /// At most this many jobs per workload.
    pub(crate) jobs: Option<usize>,
    /// Share of the fleet's GPUs the workload asks for in all.
    pub(crate) fill: f64,
    /// Seed of the job stream.
    pub(crate) seed: u64,
    /// Once everything is submitted, a run ends after this long without a new placement.
    pub(crate) settle: Duration,
    /// Creates in flight while submitting.
    pub(crate) concurrency: usize,
    /// Only this workload (default both).
    pub(crate) variant: Option<Variant>,
    /// Only this scheduler (default both).
    pub(crate) only: Option<System>,
    /// Keep the logs (operator, kube-scheduler) under this directory instead of a temporary one.
    pub(crate) log_dir: Option<PathBuf>,
    /// Child mode: run this scheduler alone and print its figures.
    pub(crate) run: Option<System>,
}

pub(crate) const USAGE: &str = "kube_scheduler_bench [--nodes N] [--jobs J] [--fill F] [--seed S] \
                     [--settle SECONDS] [--concurrency C] [--variant mixed|single] [--only kube|flotilla] \
                     [--log-dir DIR]";

pub(crate) fn parse_args(argv: &[String]) -> anyhow::Result<Args> {
    let mut args = Args {
        nodes: 200,
        jobs: None,
        fill: 0.9,
        seed: 7,
        settle: Duration::from_secs(20),
        concurrency: 16,
        variant: None,
        only: None,
        log_dir: None,
        run: None,
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("usage: {USAGE}");
            std::process::exit(0);
        }
        let value =
            it.next().with_context(|| format!("{flag}: expected a value\nusage: {USAGE}"))?;
        let bad = || format!("{flag}: cannot use {value:?}");
        match flag.as_str() {
            "--nodes" => args.nodes = value.parse().with_context(bad)?,
            "--jobs" => args.jobs = Some(value.parse().with_context(bad)?),
            "--fill" => args.fill = value.parse().with_context(bad)?,
            "--seed" => args.seed = value.parse().with_context(bad)?,
            "--settle" => args.settle = Duration::from_secs(value.parse().with_context(bad)?),
            "--concurrency" => args.concurrency = value.parse().with_context(bad)?,
            "--variant" => args.variant = Some(Variant::parse(value).with_context(bad)?),
            "--only" => args.only = Some(System::parse(value).with_context(bad)?),
            "--log-dir" => args.log_dir = Some(PathBuf::from(value)),
            "--run" => args.run = Some(System::parse(value).with_context(bad)?),
            other => bail!("unknown flag {other}\nusage: {USAGE}"),
        }
    }
    if args.nodes == 0 || !(args.fill > 0.0 && args.fill <= 1.0) || args.concurrency == 0 {
        bail!("--nodes and --concurrency must be positive and --fill in (0, 1]");
    }
    Ok(args)
}
