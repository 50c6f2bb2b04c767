//! The engine's hand-written CPU kernels: the only code of the crate allowed `unsafe`.
//!
//! SIMD intrinsics take raw pointers and `#[target_feature]` functions may only run on a CPU
//! checked to have the feature, so the kernels cannot be written in safe Rust. Every `unsafe`
//! block says, in a `// SAFETY:` comment, why it holds (`clippy::undocumented_unsafe_blocks`
//! enforces the comment); everything outside this directory stays `deny(unsafe_code)`.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub(crate) mod fused;
pub(crate) mod gemm_f32;
#[cfg(target_arch = "x86_64")]
pub(crate) mod sgemm_avx512;
