//! One MoE layer, forward + backward, tokens/s on CPU (prints figures; not a test).
//!
//! Shape as in `engine/benches/moe_layer_torch.py`: d=256, 16 routed + 1 shared SwiGLU experts
//! of width 256, sigmoid router, top-4 with a selection bias, loss = mean(out²), f32.
//!
//! `cargo run --release -p flotilla-engine --example moe_layer_bench [-- TOKENS...]`

use std::time::Instant;

use candle_core::{Device, Tensor};
use flotilla_engine::config::EngineConfig;
use flotilla_engine::model::standalone_moe_block;
use flotilla_engine::rng::normal_init;

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
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![512, 2048] } else { sizes };
    println!("threads: {}", candle_core::utils::get_num_threads());
    for tokens in sizes {
        let x = Tensor::from_vec(normal_init(2, "x", tokens * 256, 1.0), (tokens, 256), &device)?;
        let x = candle_core::Var::from_tensor(&x)?;
        for (name, hand_written) in [("autograd reference", false), ("hand-written experts", true)]
        {
            let (mut times, mut forward) = (Vec::new(), Vec::new());
            for i in 0..23 {
                let started = Instant::now();
                let out = if hand_written {
                    block.forward(x.as_tensor(), tokens, false)?.0
                } else {
                    block.experts_autograd(x.as_tensor())?
                };
                let loss = out.sqr()?.mean_all()?;
                let forward_done = started.elapsed().as_secs_f64();
                let grads = loss.backward()?;
                std::hint::black_box(grads);
                if i >= 3 {
                    times.push(started.elapsed().as_secs_f64());
                    forward.push(forward_done);
                }
            }
            let median = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (total, fwd) = (median(&mut times), median(&mut forward));
            println!(
                "flotilla/candle MoE layer fwd+bwd ({name}): T={tokens:5}  median {:.2} ms (forward {:.2} ms)  {:.0} tokens/s",
                total * 1e3,
                fwd * 1e3,
                tokens as f64 / total
            );
        }
    }
    Ok(())
}
