//! The operator's module layout, as the README's layout table states it: which top-level module
//! may use which, with no cycle, and no source file past the size where it stops being read.
//!
//! It reads the sources (every `crate::<module>` path and every `use super::…` of a top-level
//! module's files), so a new import that points the wrong way fails here, named.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module and the top-level modules it may use. The order is the layering:
/// each module uses only modules listed before it (or none).
const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("crd", &[]),
    ("ids", &[]),
    ("http", &[]),
    ("validate", &["crd"]),
    ("metrics", &["crd", "error"]),
    ("placement", &["crd", "ids", "metrics"]),
    ("lifecycle", &["crd", "placement", "validate"]),
    ("agents", &["crd"]),
    ("workers", &["agents", "crd", "ids", "lifecycle"]),
    ("endpoints", &["crd", "http"]),
    ("leader", &["error"]),
    ("admin", &["metrics"]),
    (
        "controller",
        &[
            "crd",
            "endpoints",
            "error",
            "ids",
            "lifecycle",
            "metrics",
            "placement",
            "validate",
            "workers",
        ],
    ),
    ("metrics_collect", &["agents", "controller", "crd", "metrics"]),
    ("plugin", &["crd", "http"]),
    (
        "cli",
        &[
            "admin",
            "agents",
            "controller",
            "crd",
            "ids",
            "leader",
            "metrics",
            "metrics_collect",
            "workers",
        ],
    ),
];

/// Lines a source file may have before it must be split (tests and generated code excepted).
const MAX_LINES: usize = 500;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/controller/context.rs` → `controller`).
fn top_module(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_string())
}

/// Top-level modules named as `crate::<module>` in `text`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String =
            after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
        rest = after;
    }
    out
}

/// Whether `text` is a unit-test file or lies after the `#[cfg(test)]` line of its file.
fn code_part(text: &str, file: &Path) -> String {
    if file.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_string(),
        None => text.to_string(),
    }
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> =
        LAYERS.iter().map(|(m, uses)| (*m, uses.iter().copied().collect())).collect();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = top_module(file) else { continue };
        let Some(may_use) = allowed.get(module.as_str()) else {
            wrong.push(format!("{}: module {module} is not in LAYERS", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("reading a source file");
        for used in crate_paths(&code_part(&text, file)) {
            if used != module
                && allowed.contains_key(used.as_str())
                && !may_use.contains(used.as_str())
            {
                wrong.push(format!("{}: {module} uses crate::{used}", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_layering_has_no_cycle_and_points_down() {
    for (i, (module, uses)) in LAYERS.iter().enumerate() {
        let below: BTreeSet<&str> = LAYERS[..i].iter().map(|(m, _)| *m).collect();
        for u in *uses {
            assert!(below.contains(u), "{module} may use {u}, which is not listed before it");
        }
    }
}

#[test]
fn no_source_file_outside_tests_is_over_the_limit() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let lines = code_part(&text, file).lines().count();
        if lines > MAX_LINES {
            long.push(format!("{}: {lines} lines", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split along a real seam):\n{}",
        long.join("\n")
    );
}
