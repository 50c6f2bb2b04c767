//! Expert-parallel serving: one decode step (a batch of right-padded rows, no KV cache, as the
//! batcher runs it) on the whole model against the same step on groups of 1, 2 and 4 ranks
//! (threads of this process joined by loopback TCP rings), with the weights each rank holds.
//! Prints figures; not a test.
//!
//! `cargo run --release -p flotilla-engine --example expert_parallel_bench [-- PRESET ROWS WIDTH]`
//! (default `small 8 128`). The ranks share this machine's cores, so on a 2-core machine the
//! figures show the cost of the protocol (broadcast and one all-reduce per MoE layer over
//! loopback TCP), not a speed-up: expert parallelism is there so a model larger than one
//! device's memory can serve, and so a replica can span nodes.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use flotilla_engine::collective::{GroupSpec, Ring};
use flotilla_engine::config::EngineConfig;
use flotilla_engine::model::Model;
use flotilla_engine::model::moe::ExpertShard;
use flotilla_engine::serve::batcher::Decoder;
use flotilla_engine::serve::expert_parallel::{GroupLeader, follow};

const STEPS: usize = 10;

fn batch(rows: usize, width: usize) -> (Tensor, Vec<u32>) {
    let ids: Vec<u32> = (0..rows * width).map(|i| 32 + (i * 7 % 90) as u32).collect();
    let last = (0..rows).map(|r| (width - 1 - r % 4) as u32).collect();
    (Tensor::from_vec(ids, (rows, width), &Device::Cpu).expect("ids"), last)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn megabytes(model: &Model) -> f64 {
    model.num_params() as f64 * 4.0 / 1e6
}

/// Median seconds per step of a group of `world` ranks, and rank 0's weights in MB.
fn group(config: &EngineConfig, world: usize, rows: usize, width: usize) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let master = listener.local_addr().expect("addr").to_string();
    let timeout = Duration::from_secs(60);
    let followers: Vec<_> = (1..world)
        .map(|rank| {
            let (config, master) = (config.clone(), master.clone());
            std::thread::spawn(move || {
                let mut model = Model::new(&config.model, 0, &Device::Cpu).expect("model");
                model.shard_experts(ExpertShard { rank, world }).expect("shard");
                let mut ring =
                    Ring::connect(GroupSpec { rank, world, timeout }, &master).expect("join");
                follow(&model, &mut ring).expect("follow");
            })
        })
        .collect();
    let mut model = Model::new(&config.model, 0, &Device::Cpu).expect("model");
    model.shard_experts(ExpertShard { rank: 0, world }).expect("shard");
    let held = megabytes(&model);
    let ring = if world > 1 {
        Ring::lead(GroupSpec { rank: 0, world, timeout }, listener).expect("lead")
    } else {
        Ring::single()
    };
    let mut leader = GroupLeader::new(model, ring);
    let (ids, last) = batch(rows, width);
    leader.logits(&ids, &last).expect("warm-up");
    let times = (0..STEPS)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(leader.logits(&ids, &last).expect("step"));
            started.elapsed().as_secs_f64()
        })
        .collect();
    leader.finish();
    for f in followers {
        f.join().expect("follower");
    }
    (median(times), held)
}

/// Median seconds per step of the whole model, and its weights in MB.
fn whole(config: &EngineConfig, rows: usize, width: usize) -> (f64, f64) {
    let model = Model::new(&config.model, 0, &Device::Cpu).expect("model");
    let (ids, last) = batch(rows, width);
    model.next_token_logits(&ids, &last).expect("warm-up");
    let times = (0..STEPS)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(model.next_token_logits(&ids, &last).expect("step"));
            started.elapsed().as_secs_f64()
        })
        .collect();
    (median(times), megabytes(&model))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args.first().map_or("small", String::as_str);
    let rows = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(8);
    let width = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(128);
    let config = EngineConfig::preset(preset).expect("preset");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "preset {preset}: {} routed experts per MoE layer; one decode step of {rows} rows × \
         {width} tokens; median of {STEPS}; {cores} cores, candle threads {}",
        config.model.num_routed_experts,
        candle_core::utils::get_num_threads()
    );
    println!("{:<34} {:>10} {:>9} {:>16}", "", "ms/step", "× whole", "rank 0 holds MB");
    // Every model is built just before it is timed and dropped after: with a large model still
    // alive, the next one built measured up to 1.9× slower here.
    let (base, whole_mb) = whole(&config, rows, width);
    println!("{:<34} {:>10.1} {:>9.2} {whole_mb:>16.1}", "whole model", base * 1e3, 1.0);
    for world in [1, 2, 4] {
        let (t, held) = group(&config, world, rows, width);
        let label = if world == 1 {
            "group of 1 (rank 0 path, no peers)".to_string()
        } else {
            format!("group of {world} ranks (loopback ring)")
        };
        println!("{label:<34} {:>10.1} {:>9.2} {held:>16.1}", t * 1e3, t / base);
    }
    // Once more at the end: how far the machine drifted during the run.
    let (again, _) = whole(&config, rows, width);
    println!(
        "{:<34} {:>10.1} {:>9.2}",
        "whole model again (drift check)",
        again * 1e3,
        again / base
    );
}
