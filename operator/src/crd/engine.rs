//! The engine configuration embedded in `TrainingJob.spec.engine`.
//!
//! STAND-IN: the single source of truth is `flotilla_engine::config::EngineConfig`; until that
//! type lands this open object stands in, so the CRD accepts any engine settings and only the
//! worker validates them. Replace [`EngineConfig`] with the engine's type, nothing else changes.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// The engine configuration (stand-in, see the module documentation).
pub type EngineConfig = EngineConfigStandIn;

/// An open object holding the engine's settings until the engine's own config type is embedded.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct EngineConfigStandIn(pub serde_json::Map<String, serde_json::Value>);

impl JsonSchema for EngineConfigStandIn {
    fn schema_name() -> Cow<'static, str> {
        "EngineConfig".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "description": "Settings of the built-in MoE engine (flotilla-worker): model shape, optimiser, data, steps. Passed to every worker unchanged.",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}
