//! A job's attempt ledger, written by its workers, and the check that attempts never overlapped.

use std::path::{Path, PathBuf};

use crate::Rig;
use crate::process::walk;

/// One line of a job's attempt ledger (written by each `flotilla-worker train`, see the
/// engine's `train::LedgerEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerLine {
    /// The job's UID.
    pub job: String,
    /// The attempt.
    pub attempt: u64,
    /// The worker's rank.
    pub rank: u32,
    /// True for `start`, false for `end`.
    pub start: bool,
    /// Wall-clock time, Unix nanoseconds.
    pub at: u128,
}

impl Rig {
    /// The attempt ledger of the job `name` (in its checkpoint directory), parsed; panics on a
    /// malformed line, naming it.
    pub fn ledger(&self, name: &str) -> Vec<LedgerLine> {
        let files: Vec<PathBuf> = walk(&self.dir.path().join("checkpoints"))
            .into_iter()
            .filter(|p| {
                p.file_name().is_some_and(|f| f == "attempts.ledger")
                    && p.parent()
                        .and_then(Path::file_name)
                        .is_some_and(|d| d.to_string_lossy().starts_with(&format!("{name}-")))
            })
            .collect();
        assert_eq!(files.len(), 1, "one attempt ledger for {name}, found {files:?}");
        read_ledger(&files[0])
    }
}

/// The attempt ledger at `path`, parsed; panics on a missing file or a malformed line, naming it.
pub fn read_ledger(path: &Path) -> Vec<LedgerLine> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the attempt ledger {}: {e}", path.display()));
    text.lines().map(|l| parse_ledger_line(l).unwrap_or_else(|e| panic!("{e}"))).collect()
}

impl Rig {
    /// [`assert_no_overlap`] on the ledger of the job `name`, with every log on failure.
    pub fn assert_ledger(&self, name: &str, no_end: &[(u64, u32)]) -> Vec<(u64, Vec<u32>)> {
        let ledger = self.ledger(name);
        std::panic::catch_unwind(|| assert_no_overlap(&ledger, no_end))
            .unwrap_or_else(|_| panic!("the attempt ledger of {name} (above)\n{}", self.logs()))
    }
}

pub fn parse_ledger_line(line: &str) -> Result<LedgerLine, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let bad = |what: &str| format!("ledger line {line:?}: {what}");
    if f.len() != 6 {
        return Err(bad(&format!("expected 6 tab-separated fields, got {}", f.len())));
    }
    Ok(LedgerLine {
        job: f[0].to_string(),
        attempt: f[1].parse().map_err(|_| bad("attempt is not a number"))?,
        rank: f[2].parse().map_err(|_| bad("rank is not a number"))?,
        start: match f[3] {
            "start" => true,
            "end" => false,
            other => return Err(bad(&format!("expected start or end, got {other}"))),
        },
        at: f[4].parse().map_err(|_| bad("time is not a number"))?,
    })
}

/// Asserts from a job's ledger that its attempts never overlapped: every worker that started
/// also ended (except the `(attempt, rank)`s in `no_end`, killed by SIGKILL, which cannot write),
/// and each attempt's first start comes after the last end of every earlier attempt. Returns the
/// attempts in order, with the ranks that started in each.
pub fn assert_no_overlap(ledger: &[LedgerLine], no_end: &[(u64, u32)]) -> Vec<(u64, Vec<u32>)> {
    assert!(!ledger.is_empty(), "the attempt ledger is empty");
    let jobs: std::collections::BTreeSet<&str> = ledger.iter().map(|l| l.job.as_str()).collect();
    assert_eq!(jobs.len(), 1, "one job in the ledger, got {jobs:?}");
    // attempt -> (first start, last end, ranks started, ranks ended)
    let mut attempts: std::collections::BTreeMap<u64, (u128, u128, Vec<u32>, Vec<u32>)> =
        Default::default();
    for l in ledger {
        let a = attempts.entry(l.attempt).or_insert((u128::MAX, 0, Vec::new(), Vec::new()));
        if l.start {
            a.0 = a.0.min(l.at);
            a.2.push(l.rank);
        } else {
            a.1 = a.1.max(l.at);
            a.3.push(l.rank);
        }
    }
    let mut out = Vec::new();
    let mut earlier_end: Option<(u64, u128)> = None;
    for (&n, (first_start, last_end, started, ended)) in &attempts {
        for rank in started {
            let expected_end = !no_end.contains(&(n, *rank));
            assert_eq!(
                ended.contains(rank),
                expected_end,
                "attempt {n} rank {rank}: end line expected: {expected_end}\n{ledger:#?}"
            );
        }
        if let Some((m, end)) = earlier_end {
            assert!(
                *first_start > end,
                "attempt {n} started at {first_start} before attempt {m} ended at {end}\n{ledger:#?}"
            );
        }
        let end = earlier_end.map_or(*last_end, |(_, e)| e.max(*last_end));
        earlier_end = Some((n, end));
        let mut ranks = started.clone();
        ranks.sort_unstable();
        out.push((n, ranks));
    }
    out
}
