//! Ring all-reduce over loopback TCP with 1–4 ranks, including a rank that dies.
#![cfg(feature = "runtime")]

use std::time::{Duration, Instant};

use flotilla_engine::collective::CollectiveError;

mod common;
use common::with_group;

#[test]
fn all_reduce_sums_identically_on_1_to_4_ranks() {
    for world in 1..=4 {
        // 10 values do not split evenly over 3 or 4 ranks; two rounds check sequence numbers.
        let results = with_group(world, Duration::from_secs(10), move |mut ring| {
            let rank = ring.spec().rank as f32;
            let mut out = Vec::new();
            for round in 0..2 {
                let mut v: Vec<f32> =
                    (0..10).map(|i| rank * 100.0 + i as f32 + round as f32).collect();
                ring.all_reduce_sum(&mut v).expect("all-reduce");
                out.push(v);
            }
            out
        });
        let rank_sum: f32 = (0..world).map(|r| r as f32 * 100.0).sum();
        for (round, _) in results[0].iter().enumerate() {
            let expected: Vec<f32> =
                (0..10).map(|i| rank_sum + (i as f32 + round as f32) * world as f32).collect();
            for rank_result in &results {
                assert_eq!(rank_result[round], expected, "world {world} round {round}");
            }
        }
    }
}

#[test]
fn a_dead_rank_is_named_by_every_survivor_without_hanging() {
    let started = Instant::now();
    let results = with_group(4, Duration::from_secs(20), |mut ring| {
        let rank = ring.spec().rank;
        let mut v = vec![1.0f32; 1000];
        ring.all_reduce_sum(&mut v).expect("first round succeeds");
        if rank == 2 {
            drop(ring); // the process "dies": its sockets close
            return None;
        }
        Some(ring.all_reduce_sum(&mut v).expect_err("second round must fail"))
    });
    // Survivors learn within seconds, well before the 20 s timeout, thanks to closed sockets
    // and abort frames travelling round the ring.
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            None => assert_eq!(rank, 2),
            Some(CollectiveError::PeerLost { lost, .. }) => assert_eq!(lost, 2, "rank {rank}"),
            Some(other) => panic!("rank {rank}: unexpected error {other}"),
        }
    }
}

#[test]
fn a_silent_rank_times_out() {
    let results = with_group(2, Duration::from_millis(500), |mut ring| {
        if ring.spec().rank == 1 {
            std::thread::sleep(Duration::from_millis(1500)); // alive but hung
            return None;
        }
        Some(ring.all_reduce_sum(&mut [1.0, 2.0]).expect_err("must time out"))
    });
    match &results[0] {
        Some(CollectiveError::PeerLost { lost: 1, reason, .. }) => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
}
