//! The engine configuration: one type tree for the model, training and serving.
//!
//! This module has no heavy dependencies (serde and schemars only) so the operator can embed
//! [`EngineConfig`] in its custom resources with `default-features = false`. Field names are
//! camelCase on the wire; every field's doc comment becomes `kubectl explain` text.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A complete engine configuration: model architecture, training run and serving settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineConfig {
    /// Architecture of the DeepSeek-style Mixture-of-Experts decoder.
    pub model: ModelConfig,
    /// Settings of a training run (`flotilla-worker train`).
    #[serde(default)]
    pub training: TrainingConfig,
    /// Settings of the OpenAI-compatible server (`flotilla-worker serve`).
    #[serde(default)]
    pub serving: ServingConfig,
}

/// Architecture of the decoder: dense layers first, then MoE layers with shared and routed experts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size; the byte-level tokenizer needs at least 256.
    pub vocab_size: u32,
    /// Width of the residual stream.
    pub hidden_size: u32,
    /// Number of decoder layers, dense and MoE together.
    pub num_layers: u32,
    /// How many of the first layers use a dense SwiGLU MLP instead of MoE.
    pub num_dense_layers: u32,
    /// Attention heads; must divide `hiddenSize` into an even head width (rotary embedding).
    pub num_heads: u32,
    /// Inner width of the dense layers' SwiGLU MLP.
    pub intermediate_size: u32,
    /// Inner width of one routed expert (and of each shared expert).
    pub moe_intermediate_size: u32,
    /// Number of fine-grained routed experts per MoE layer.
    pub num_routed_experts: u32,
    /// Number of always-active shared experts per MoE layer (0 for none).
    pub num_shared_experts: u32,
    /// Routed experts chosen per token (top-K).
    pub experts_per_token: u32,
    /// Expert groups for group-limited routing; must divide `numRoutedExperts`.
    pub num_expert_groups: u32,
    /// Groups a token may route into (the top groups by the sum of their two best biased scores).
    pub topk_groups: u32,
    /// Factor applied to the normalised routing weights.
    pub route_scale: f64,
    /// Step γ of the auxiliary-loss-free bias update `b += γ·sign(mean load − load)`; 0 disables it.
    pub bias_update_speed: f64,
    /// Weight α of the sequence-wise balance loss; 0 disables it.
    pub aux_loss_alpha: f64,
    /// Base of the rotary position embedding.
    pub rope_theta: f64,
    /// Epsilon of RMSNorm.
    pub rms_norm_eps: f64,
    /// Longest sequence (prompt plus generation) the model accepts.
    pub max_seq_len: u32,
    /// Standard deviation of the seeded normal initialisation.
    pub init_std: f64,
}

/// Learning-rate schedule after the linear warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LrSchedule {
    /// Keep the peak learning rate.
    Constant,
    /// Cosine decay from the peak to `minLearningRate` at the last step.
    Cosine,
    /// Linear decay from the peak to `minLearningRate` at the last step.
    Linear,
}

/// The data a run trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Dataset {
    /// The small English text corpus shipped with the engine, byte-tokenised.
    Corpus,
    /// Arithmetic sequences over 16 letters with a per-sequence stride of 1, 2 or 3: after two
    /// tokens everything is determined, so the reachable loss is `ln 3 / (seqLen − 1)` nats.
    Synthetic,
}

/// Settings of a training run. The checkpoint interval usually comes from the operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingConfig {
    /// Optimizer steps in the whole run.
    pub steps: u64,
    /// Sequences per step on each rank (the global batch is this times the world size).
    pub batch_size: u32,
    /// Tokens per training sequence; at most `model.maxSeqLen`.
    pub seq_len: u32,
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// Learning rate at the end of a decaying schedule.
    pub min_learning_rate: f64,
    /// Steps of linear warm-up from 0 to the peak.
    pub warmup_steps: u64,
    /// Shape of the learning rate after warm-up.
    pub schedule: LrSchedule,
    /// Decoupled weight decay of AdamW (not applied to norms and biases).
    pub weight_decay: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this value; 0 disables clipping.
    pub grad_clip: f64,
    /// Seed of initialisation and data order; a run is reproducible from it.
    pub seed: u64,
    /// Which data to train on.
    pub dataset: Dataset,
    /// Write a checkpoint every this many steps; 0 writes only at the end and on SIGTERM.
    pub checkpoint_interval: u64,
    /// Loss the run is expected to reach (reported at the end; informative only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_loss: Option<f64>,
    /// Seconds a rank waits on a peer in the gradient all-reduce before declaring it lost.
    pub collective_timeout_seconds: u64,
}

/// Settings of the OpenAI-compatible server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServingConfig {
    /// Name under which `/v1/models` lists the model and requests address it.
    pub model_name: String,
    /// Most requests decoded together in one batch.
    pub max_batch_size: u32,
    /// `max_tokens` used when a request gives none.
    pub default_max_tokens: u32,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 8,
            seq_len: 64,
            learning_rate: 3e-3,
            min_learning_rate: 3e-4,
            warmup_steps: 10,
            schedule: LrSchedule::Cosine,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            seed: 42,
            dataset: Dataset::Corpus,
            checkpoint_interval: 50,
            target_loss: None,
            collective_timeout_seconds: 30,
        }
    }
}

impl Default for ServingConfig {
    fn default() -> Self {
        Self { model_name: "flotilla-moe".to_owned(), max_batch_size: 8, default_max_tokens: 64 }
    }
}

/// Names of the built-in presets, for help texts and errors.
pub const PRESETS: &[&str] = &["tiny", "small", "base"];

impl EngineConfig {
    /// A built-in configuration by name: `tiny` (CPU tests, seconds), `small` (CPU demo on the
    /// corpus) or `base` (a GPU-sized model).
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "base" => Some(Self::base()),
            _ => None,
        }
    }

    fn tiny() -> Self {
        Self {
            model: ModelConfig {
                vocab_size: 256,
                hidden_size: 64,
                num_layers: 2,
                num_dense_layers: 1,
                num_heads: 4,
                intermediate_size: 128,
                moe_intermediate_size: 32,
                num_routed_experts: 8,
                num_shared_experts: 1,
                experts_per_token: 2,
                num_expert_groups: 4,
                topk_groups: 2,
                route_scale: 1.0,
                bias_update_speed: 1e-3,
                aux_loss_alpha: 1e-4,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                max_seq_len: 128,
                init_std: 0.02,
            },
            training: TrainingConfig {
                steps: 120,
                batch_size: 8,
                seq_len: 24,
                learning_rate: 1e-2,
                min_learning_rate: 1e-3,
                warmup_steps: 10,
                dataset: Dataset::Synthetic,
                checkpoint_interval: 0,
                target_loss: Some(0.15),
                ..TrainingConfig::default()
            },
            serving: ServingConfig::default(),
        }
    }

    fn small() -> Self {
        Self {
            model: ModelConfig {
                vocab_size: 256,
                hidden_size: 256,
                num_layers: 4,
                num_dense_layers: 1,
                num_heads: 8,
                intermediate_size: 512,
                moe_intermediate_size: 128,
                num_routed_experts: 16,
                num_shared_experts: 1,
                experts_per_token: 4,
                num_expert_groups: 4,
                topk_groups: 2,
                route_scale: 1.0,
                bias_update_speed: 1e-3,
                aux_loss_alpha: 1e-4,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                max_seq_len: 256,
                init_std: 0.02,
            },
            training: TrainingConfig {
                steps: 1000,
                batch_size: 8,
                seq_len: 128,
                ..TrainingConfig::default()
            },
            serving: ServingConfig::default(),
        }
    }

    fn base() -> Self {
        Self {
            model: ModelConfig {
                vocab_size: 256,
                hidden_size: 1024,
                num_layers: 12,
                num_dense_layers: 1,
                num_heads: 16,
                intermediate_size: 2816,
                moe_intermediate_size: 352,
                num_routed_experts: 64,
                num_shared_experts: 2,
                experts_per_token: 6,
                num_expert_groups: 8,
                topk_groups: 4,
                route_scale: 2.5,
                bias_update_speed: 1e-3,
                aux_loss_alpha: 1e-4,
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                max_seq_len: 1024,
                init_std: 0.006,
            },
            training: TrainingConfig {
                steps: 20_000,
                batch_size: 16,
                seq_len: 1024,
                learning_rate: 4.2e-4,
                min_learning_rate: 4.2e-5,
                warmup_steps: 500,
                checkpoint_interval: 500,
                ..TrainingConfig::default()
            },
            serving: ServingConfig { max_batch_size: 32, ..ServingConfig::default() },
        }
    }

    /// Checks every value, returning all problems at once, each naming its field path.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.model.check(&mut Checker { errors: &mut errors, prefix: "model" });
        self.training.check(&self.model, &mut Checker { errors: &mut errors, prefix: "training" });
        self.serving.check(&mut Checker { errors: &mut errors, prefix: "serving" });
        if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
    }
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        (self.hidden_size / self.num_heads.max(1)) as usize
    }

    /// Number of MoE layers (all layers after the dense ones).
    pub fn num_moe_layers(&self) -> u32 {
        self.num_layers.saturating_sub(self.num_dense_layers)
    }

    fn check(&self, c: &mut Checker<'_>) {
        c.require(
            "vocabSize",
            self.vocab_size >= 256,
            "at least 256 (byte-level tokenizer)",
            self.vocab_size,
        );
        c.require("hiddenSize", self.hidden_size > 0, "a positive width", self.hidden_size);
        c.require("numLayers", self.num_layers > 0, "at least one layer", self.num_layers);
        c.require(
            "numDenseLayers",
            self.num_dense_layers <= self.num_layers,
            format!("at most numLayers ({})", self.num_layers),
            self.num_dense_layers,
        );
        let heads_ok = self.num_heads > 0 && self.hidden_size.is_multiple_of(self.num_heads);
        c.require(
            "numHeads",
            heads_ok && (self.hidden_size / self.num_heads).is_multiple_of(2),
            format!("a divisor of hiddenSize ({}) giving an even head width", self.hidden_size),
            self.num_heads,
        );
        c.require(
            "intermediateSize",
            self.intermediate_size > 0,
            "a positive width",
            self.intermediate_size,
        );
        if self.num_moe_layers() == 0 {
            return;
        }
        let experts = self.num_routed_experts;
        c.require(
            "moeIntermediateSize",
            self.moe_intermediate_size > 0,
            "a positive width",
            self.moe_intermediate_size,
        );
        c.require("numRoutedExperts", experts > 0, "at least one routed expert", experts);
        c.require(
            "expertsPerToken",
            (1..=experts).contains(&self.experts_per_token),
            format!("between 1 and numRoutedExperts ({experts})"),
            self.experts_per_token,
        );
        let groups = self.num_expert_groups;
        c.require(
            "numExpertGroups",
            groups > 0 && experts.is_multiple_of(groups),
            format!("a divisor of numRoutedExperts ({experts})"),
            groups,
        );
        c.require(
            "topkGroups",
            (1..=groups).contains(&self.topk_groups),
            format!("between 1 and numExpertGroups ({groups})"),
            self.topk_groups,
        );
        if groups > 0 && experts.is_multiple_of(groups) && (1..=groups).contains(&self.topk_groups)
        {
            let reachable = self.topk_groups * (experts / groups);
            c.require(
                "expertsPerToken",
                self.experts_per_token <= reachable,
                format!("at most the experts in topkGroups groups ({reachable})"),
                self.experts_per_token,
            );
        }
        c.positive("routeScale", self.route_scale);
        c.non_negative("biasUpdateSpeed", self.bias_update_speed);
        c.non_negative("auxLossAlpha", self.aux_loss_alpha);
        c.positive("ropeTheta", self.rope_theta);
        c.positive("rmsNormEps", self.rms_norm_eps);
        c.positive("initStd", self.init_std);
        c.require("maxSeqLen", self.max_seq_len >= 2, "at least 2", self.max_seq_len);
    }
}

impl TrainingConfig {
    fn check(&self, model: &ModelConfig, c: &mut Checker<'_>) {
        c.require("steps", self.steps > 0, "at least 1", self.steps);
        c.require("batchSize", self.batch_size > 0, "at least 1", self.batch_size);
        c.require(
            "seqLen",
            (2..=model.max_seq_len).contains(&self.seq_len),
            format!("between 2 and model.maxSeqLen ({})", model.max_seq_len),
            self.seq_len,
        );
        c.positive("learningRate", self.learning_rate);
        c.require(
            "minLearningRate",
            self.min_learning_rate >= 0.0 && self.min_learning_rate <= self.learning_rate,
            format!("between 0 and learningRate ({})", self.learning_rate),
            self.min_learning_rate,
        );
        c.require(
            "warmupSteps",
            self.warmup_steps <= self.steps,
            format!("at most steps ({})", self.steps),
            self.warmup_steps,
        );
        c.non_negative("weightDecay", self.weight_decay);
        c.require("beta1", (0.0..1.0).contains(&self.beta1), "in [0, 1)", self.beta1);
        c.require("beta2", (0.0..1.0).contains(&self.beta2), "in [0, 1)", self.beta2);
        c.positive("adamEps", self.adam_eps);
        c.non_negative("gradClip", self.grad_clip);
        if let Some(target) = self.target_loss {
            c.positive("targetLoss", target);
        }
        c.require(
            "collectiveTimeoutSeconds",
            self.collective_timeout_seconds > 0,
            "at least 1",
            self.collective_timeout_seconds,
        );
    }
}

impl ServingConfig {
    fn check(&self, c: &mut Checker<'_>) {
        c.require(
            "modelName",
            !self.model_name.trim().is_empty(),
            "a non-empty name",
            format!("{:?}", self.model_name),
        );
        c.require("maxBatchSize", self.max_batch_size > 0, "at least 1", self.max_batch_size);
        c.require(
            "defaultMaxTokens",
            self.default_max_tokens > 0,
            "at least 1",
            self.default_max_tokens,
        );
    }
}

/// One invalid value: where it is, what was expected, and what came.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    /// Dotted camelCase path, for example `model.numExpertGroups`.
    pub path: String,
    /// What a valid value looks like.
    pub expected: String,
    /// The value that was given.
    pub actual: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: expected {}, got {}", self.path, self.expected, self.actual)
    }
}

/// Every problem [`EngineConfig::validate`] found.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("invalid engine config: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<FieldError>);

struct Checker<'a> {
    errors: &'a mut Vec<FieldError>,
    prefix: &'static str,
}

impl Checker<'_> {
    fn require(
        &mut self,
        field: &str,
        ok: bool,
        expected: impl Into<String>,
        actual: impl fmt::Display,
    ) {
        if !ok {
            self.errors.push(FieldError {
                path: format!("{}.{field}", self.prefix),
                expected: expected.into(),
                actual: actual.to_string(),
            });
        }
    }

    fn positive(&mut self, field: &str, value: f64) {
        self.require(field, value.is_finite() && value > 0.0, "a finite number above 0", value);
    }

    fn non_negative(&mut self, field: &str, value: f64) {
        self.require(
            field,
            value.is_finite() && value >= 0.0,
            "a finite number of at least 0",
            value,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in PRESETS {
            let config = EngineConfig::preset(name).expect("preset exists");
            assert_eq!(config.validate(), Ok(()), "preset {name}");
        }
        assert!(EngineConfig::preset("huge").is_none());
    }

    #[test]
    fn errors_name_path_expected_and_actual() {
        let mut config = EngineConfig::preset("tiny").expect("tiny");
        config.model.num_expert_groups = 3;
        config.training.seq_len = 1000;
        let errors = config.validate().expect_err("invalid").0;
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["model.numExpertGroups", "training.seqLen"]);
        assert_eq!(
            errors[0].to_string(),
            "model.numExpertGroups: expected a divisor of numRoutedExperts (8), got 3"
        );
        assert_eq!(errors[1].actual, "1000");
    }

    #[test]
    fn unknown_fields_are_refused_and_defaults_fill_sections() {
        let tiny = EngineConfig::preset("tiny").expect("tiny");
        let mut json = serde_json::to_value(&tiny.model).expect("serialises");
        let parsed: EngineConfig =
            serde_json::from_value(serde_json::json!({ "model": json.clone() })).expect("parses");
        assert_eq!(parsed.training, TrainingConfig::default());
        json["numExperts"] = 4.into();
        let err = serde_json::from_value::<EngineConfig>(serde_json::json!({ "model": json }))
            .expect_err("unknown");
        assert!(err.to_string().contains("numExperts"), "{err}");
    }

    #[test]
    fn schema_documents_fields() {
        let schema = serde_json::to_string(&schemars::schema_for!(EngineConfig)).expect("schema");
        assert!(schema.contains("numRoutedExperts"));
        assert!(schema.contains("Number of fine-grained routed experts"));
    }
}
