//! One MoE layer, forward + backward, tokens/s on CPU (prints figures; not a test).
//!
//! Shape as in `engine/benches/moe_layer_torch.py`: d=256, 16 routed + 1 shared SwiGLU experts
//! of width 256, sigmoid router, top-4 with a selection bias, loss = mean(out²), f32.
//! Two variants run interleaved, step by step, so a loaded machine slows both alike: the
//! hand-written experts of `MoeBlock::forward` and the autograd reference
//! (`MoeBlock::experts_autograd`). Besides wall time it prints the process CPU time per step,
//! which a shared machine disturbs less.
//!
//! `cargo run --release -p flotilla-engine --example moe_layer_bench [-- [--hand-written] TOKENS...]`
//! (`--hand-written`: skip the reference, e.g. to profile the hand-written step alone).

use std::time::Instant;

use candle_core::{Device, Tensor};
use flotilla_engine::config::EngineConfig;
use flotilla_engine::model::moe::MoeBlock;
use flotilla_engine::model::standalone_moe_block;
use flotilla_engine::rng::normal_init;

const VARIANTS: [&str; 2] = ["hand-written experts", "autograd reference"];

/// User + system CPU seconds of this process so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime; USER_HZ is 100 on Linux
}

fn step(block: &MoeBlock, x: &Tensor, hand_written: bool) -> candle_core::Result<f64> {
    let started = Instant::now();
    let out = if hand_written {
        block.forward(x, x.dim(0)?, false)?.0
    } else {
        block.experts_autograd(x)?
    };
    let loss = out.sqr()?.mean_all()?;
    std::hint::black_box(loss.backward()?);
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> candle_core::Result<()> {
    let mut config = EngineConfig::preset("small").expect("small").model;
    config.hidden_size = 256;
    config.moe_intermediate_size = 256;
    config.num_routed_experts = 16;
    config.num_shared_experts = 1;
    config.experts_per_token = 4;
    config.num_expert_groups = 1;
    config.topk_groups = 1;
    config.aux_loss_alpha = 0.0;
    let device = Device::Cpu;
    let (mut block, _params) = standalone_moe_block(&config, 0, &device)?;
    block.bias = normal_init(1, "bias", 16, 0.01);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let variants = if args.iter().any(|a| a == "--hand-written") { 1 } else { 2 };
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![512, 2048] } else { sizes };
    println!("threads: {}", candle_core::utils::get_num_threads());
    for tokens in sizes {
        let x = Tensor::from_vec(normal_init(2, "x", tokens * 256, 1.0), (tokens, 256), &device)?;
        let x = candle_core::Var::from_tensor(&x)?;
        let mut times = [Vec::new(), Vec::new()];
        let mut cpu = [0.0f64; 2];
        for i in 0..23 {
            for (v, hand_written) in [true, false].into_iter().enumerate().take(variants) {
                let cpu_before = cpu_seconds();
                let wall = step(&block, x.as_tensor(), hand_written)?;
                if i >= 3 {
                    times[v].push(wall);
                    cpu[v] += cpu_seconds() - cpu_before;
                }
            }
        }
        for (v, name) in VARIANTS.iter().enumerate().take(variants) {
            let t = &mut times[v];
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            println!(
                "flotilla/candle MoE layer fwd+bwd ({name}): T={tokens:5}  median {:.2} ms  \
                 {:.0} tokens/s  (CPU {:.0} ms/step)",
                median * 1e3,
                tokens as f64 / median,
                cpu[v] / t.len() as f64 * 1e3
            );
        }
    }
    Ok(())
}
