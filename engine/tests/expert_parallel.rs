//! Expert-parallel serving over loopback rings: 2 and 3 ranks give the whole model's logits,
//! each rank holding only its share of the experts; a clean finish stops the followers; a lost
//! follower is a fatal error for the leader, and a lost leader for the followers.
#![cfg(feature = "runtime")]

use std::time::Duration;

use candle_core::{Device, Tensor};
use flotilla_engine::config::EngineConfig;
use flotilla_engine::model::Model;
use flotilla_engine::model::moe::ExpertShard;
use flotilla_engine::serve::batcher::Decoder;
use flotilla_engine::serve::expert_parallel::{FollowError, GroupLeader, follow};

mod common;
use common::with_group;

const SEED: u64 = 5;

fn config() -> EngineConfig {
    EngineConfig::preset("tiny").expect("tiny")
}

fn model() -> Model {
    Model::new(&config().model, SEED, &Device::Cpu).expect("model")
}

fn sharded(rank: usize, world: usize) -> Model {
    let mut m = model();
    m.shard_experts(ExpertShard { rank, world }).expect("shard");
    m
}

/// Two right-padded rows of different lengths.
fn batch() -> (Tensor, Vec<u32>) {
    let rows: [&[u32]; 2] = [&[104, 101, 108, 108, 111, 32, 119], &[97, 98, 99]];
    let width = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut ids = Vec::new();
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(0, width - r.len()));
    }
    let last = rows.iter().map(|r| r.len() as u32 - 1).collect();
    (Tensor::from_vec(ids, (rows.len(), width), &Device::Cpu).expect("ids"), last)
}

#[test]
fn sharded_groups_match_the_whole_model_and_hold_a_share_of_the_experts() {
    let (ids, last) = batch();
    let whole: Vec<Vec<f32>> =
        model().next_token_logits(&ids, &last).expect("logits").to_vec2().expect("vec");
    let whole_params = model().num_params();
    for world in [2, 3] {
        let results = with_group(world, Duration::from_secs(10), move |mut ring| {
            let rank = ring.spec().rank;
            let model = sharded(rank, world);
            let params = model.num_params();
            if rank > 0 {
                follow(&model, &mut ring).expect("follower ends on stop");
                return (params, None);
            }
            let mut leader = GroupLeader::new(model, ring);
            let (ids, last) = batch();
            let mut steps = Vec::new();
            for _ in 0..2 {
                let logits = leader.logits(&ids, &last).expect("sharded logits");
                steps.push(logits.to_vec2::<f32>().expect("vec"));
                leader.idle().expect("heartbeat");
            }
            leader.finish();
            (params, Some(steps))
        });
        let steps = results[0].1.as_ref().expect("leader's logits");
        for logits in steps {
            for (b, (got, want)) in logits.iter().zip(&whole).enumerate() {
                let gap = got.iter().zip(want).map(|(a, w)| (a - w).abs()).fold(0f32, f32::max);
                assert!(gap < 1e-4, "world {world}, row {b}: largest gap {gap}");
            }
        }
        // Every rank freed the others' experts: the ranks hold each routed expert once, and
        // everything else each.
        let per_rank: Vec<usize> = results.iter().map(|r| r.0).collect();
        assert!(per_rank.iter().all(|&p| p < whole_params), "world {world}: {per_rank:?}");
        let routed_total: usize = per_rank.iter().sum::<usize>() - (world - 1) * shared_params();
        assert_eq!(routed_total, whole_params, "world {world}: {per_rank:?}");
    }
}

/// Parameters every rank keeps whatever its shard: all but the routed experts.
fn shared_params() -> usize {
    let m = model();
    let routed: usize = m
        .params()
        .iter()
        .filter(|(name, _)| name.contains(".mlp.experts."))
        .map(|(_, v)| v.elem_count())
        .sum();
    m.num_params() - routed
}

#[test]
fn a_lost_follower_is_fatal_for_the_leader_and_a_lost_leader_for_the_followers() {
    let results = with_group(3, Duration::from_secs(10), |mut ring| {
        let rank = ring.spec().rank;
        let model = sharded(rank, 3);
        match rank {
            0 => {
                let mut leader = GroupLeader::new(model, ring);
                let (ids, last) = batch();
                leader.logits(&ids, &last).expect("first step with every rank");
                let err = leader.logits(&ids, &last).expect_err("rank 2 is gone");
                assert!(err.fatal, "{}", err.message);
                Some(err.message)
            }
            1 => {
                let err = follow(&model, &mut ring).expect_err("the group broke");
                assert!(matches!(err, FollowError::Group(_)), "{err}");
                Some(err.to_string())
            }
            _ => {
                // Serve one step, then "die": the ring's sockets close.
                let mut header = [0f32; 3];
                ring.all_reduce_sum(&mut header).expect("header");
                let [_, b, w] = header;
                let mut payload = vec![0f32; (b * w + b) as usize];
                ring.all_reduce_sum(&mut payload).expect("payload");
                let ids: Vec<u32> = payload[..(b * w) as usize].iter().map(|&v| v as u32).collect();
                let last: Vec<u32> =
                    payload[(b * w) as usize..].iter().map(|&v| v as u32).collect();
                let ids =
                    Tensor::from_vec(ids, (b as usize, w as usize), &Device::Cpu).expect("ids");
                let _ = model.next_token_logits_with(&ids, &last, &mut |share: Tensor| {
                    let shape = share.shape().clone();
                    let mut v: Vec<f32> = share.flatten_all()?.to_vec1()?;
                    ring.all_reduce_sum(&mut v).map_err(candle_core::Error::wrap)?;
                    Tensor::from_vec(v, shape, &Device::Cpu)
                });
                drop(ring);
                None
            }
        }
    });
    let leader = results[0].as_deref().expect("leader's error");
    assert!(leader.contains("lost rank 2"), "{leader}");
    assert!(results[1].is_some());
}

#[test]
fn more_ranks_than_experts_are_refused_naming_the_counts() {
    let mut m = model();
    let experts = config().model.num_routed_experts as usize;
    let err = m.shard_experts(ExpertShard { rank: 0, world: experts + 1 }).expect_err("too many");
    assert!(err.contains(&format!("{} ranks", experts + 1)), "{err}");
    assert!(err.contains(&format!("{experts} routed experts")), "{err}");
}
