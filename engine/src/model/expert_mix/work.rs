//! The mix's plumbing: operands as slices, gathering and splitting buffers, and the thread pool
//! the experts run on.

use std::cmp::Reverse;
use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Result, Storage};

use crate::model::scratch::Scratch;

/// The contiguous f32 values of a CPU operand.
pub(super) fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("moe-expert-mix: {what} must be contiguous f32"),
    }
}

/// The contiguous f32 values of an operand, which must be on the CPU.
pub(super) fn storage_f32<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => cpu_f32(s, l, what),
        _ => candle_core::bail!("moe-expert-mix: {what} must be on the CPU"),
    }
}

/// The rows `rows` of `x` (`width` values each), one after another.
pub(super) fn gather(x: &[f32], rows: &[u32], width: usize) -> Scratch {
    let mut out = Scratch::reuse(rows.len() * width);
    for (dst, &r) in out.chunks_exact_mut(width).zip(rows) {
        dst.copy_from_slice(&x[r as usize * width..(r as usize + 1) * width]);
    }
    out
}

/// `buf` cut into consecutive parts of the given lengths.
pub(super) fn split_mut(buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut parts = Vec::new();
    let mut rest = buf;
    for len in lens {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// `buf` cut into consecutive parts of the given lengths.
pub(super) fn split_ref(buf: &[f32], lens: impl Iterator<Item = usize>) -> Vec<&[f32]> {
    let mut parts = Vec::new();
    let mut rest = buf;
    for len in lens {
        let (head, tail) = rest.split_at(len);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// Runs `(cost, task)` pairs on up to `threads` threads, costliest first, each thread taking the
/// next task when it finishes one: on a shared machine a descheduled thread then delays the step
/// by one task at most, where a fixed split would wait for its whole share.
pub(super) fn in_parallel<T: Send>(
    mut tasks: Vec<(usize, T)>,
    threads: usize,
    run: impl Fn(T) + Sync,
) {
    tasks.retain(|(cost, _)| *cost > 0);
    tasks.sort_by_key(|(cost, _)| Reverse(*cost));
    let workers = threads.min(tasks.len());
    if workers <= 1 {
        tasks.into_iter().for_each(|(_, t)| run(t));
        return;
    }
    let queue = Mutex::new(tasks.into_iter().map(|(_, t)| t));
    let work = || {
        loop {
            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
            match next {
                Some(task) => run(task),
                None => break,
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 1..workers {
            scope.spawn(work);
        }
        work();
    });
}
