//! The images built here (`scripts/oci_image.py`, for the test node) and the Dockerfiles users
//! build (`deploy/docker/*.Dockerfile`) must be the same images to Kubernetes: the same
//! entrypoint, command, user, stop signal and ports, and the binaries where the Dockerfile puts
//! them. Built from stand-in binaries, so this needs neither Docker nor a cargo build.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// What the final stage of a Dockerfile says about the image at run time.
#[derive(Debug, Default)]
struct FinalStage {
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    stop_signal: Option<String>,
    ports: BTreeSet<String>,
    /// Paths the binaries built in an earlier stage are copied to.
    copied: Vec<String>,
}

/// Parses the instructions after the last `FROM`. Continuation lines are joined; only the
/// instructions above are read (RUN, ENV, WORKDIR and the rest do not shape what we compare).
fn final_stage(dockerfile: &str) -> FinalStage {
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if current.is_empty() && (line.starts_with('#') || line.is_empty()) {
            continue;
        }
        if let Some(body) = line.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(line);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.to_uppercase().starts_with("FROM "))
        .expect("a Dockerfile has a FROM");
    let mut stage = FinalStage::default();
    for instruction in &instructions[last_from + 1..] {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((instruction, ""));
        let rest = rest.trim();
        let exec_form = || -> Vec<String> {
            serde_json::from_str(rest)
                .unwrap_or_else(|e| panic!("{keyword} {rest}: expected the exec (JSON) form: {e}"))
        };
        match keyword.to_uppercase().as_str() {
            "USER" => stage.user = Some(rest.to_string()),
            "ENTRYPOINT" => stage.entrypoint = Some(exec_form()),
            "CMD" => stage.cmd = Some(exec_form()),
            "STOPSIGNAL" => stage.stop_signal = Some(rest.to_string()),
            "EXPOSE" => stage.ports.extend(
                rest.split_whitespace()
                    .map(|p| if p.contains('/') { p.to_string() } else { format!("{p}/tcp") }),
            ),
            "COPY" if rest.starts_with("--from=") => {
                let words: Vec<&str> = rest.split_whitespace().skip(1).collect();
                let (dest, sources) = words.split_last().expect("COPY has a destination");
                // As Docker does: one source to a destination without a trailing slash is copied
                // to that path; otherwise into that directory.
                if let [_] = sources
                    && !dest.ends_with('/')
                {
                    stage.copied.push(dest.to_string());
                    continue;
                }
                for source in sources {
                    let name = Path::new(source).file_name().expect("a file").to_string_lossy();
                    stage.copied.push(format!("{}/{name}", dest.trim_end_matches('/')));
                }
            }
            _ => {}
        }
    }
    stage
}

/// Builds `image` with `scripts/oci_image.py` from stand-in binaries (copies of `true`) and
/// returns its configuration and its layer's file listing.
fn build_local(image: &str, out: &Path) -> (Value, BTreeSet<String>) {
    let bins = out.join("bins");
    std::fs::create_dir_all(&bins).unwrap();
    for name in ["flotilla-operator", "flotilla-agent", "flotilla-worker", "pause"] {
        std::fs::copy("/bin/true", bins.join(name)).expect("copying /bin/true");
    }
    let script = flotilla_tests::workspace().join("scripts/oci_image.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--pause")
        .arg(bins.join("pause"))
        .arg("--out")
        .arg(out)
        .arg(image)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "oci_image.py {image}: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let layout = out.join(image);
    let read = |digest: &str| -> Value {
        let path = layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap());
    let layer: PathBuf = layout
        .join("blobs/sha256")
        .join(manifest["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:"));
    let listing = Command::new("tar").arg("-tvf").arg(&layer).output().expect("tar");
    assert!(listing.status.success());
    // `-rwxr-xr-x 0/0 SIZE DATE TIME PATH`: keep the executable files' paths, rooted.
    let files = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|l| l.starts_with("-rwx"))
        .filter_map(|l| l.split_whitespace().last().map(|p| format!("/{p}")))
        .collect();
    let passwd =
        Command::new("tar").arg("-xOf").arg(&layer).arg("etc/passwd").output().expect("tar");
    let mut config = config["config"].clone();
    config["passwd"] = Value::String(String::from_utf8_lossy(&passwd.stdout).into_owned());
    (config, files)
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect())
}

fn check_agreement(image: &str, dockerfile: &str) {
    let path = flotilla_tests::workspace().join("deploy/docker").join(dockerfile);
    let stage = final_stage(&std::fs::read_to_string(&path).expect("reading the Dockerfile"));
    let out = tempfile::tempdir().unwrap();
    let (config, files) = build_local(image, out.path());
    let what = format!("{image} image (scripts/oci_image.py) vs {dockerfile}");

    assert_eq!(config["User"].as_str(), stage.user.as_deref(), "{what}: user");
    assert_eq!(strings(&config["Entrypoint"]), stage.entrypoint, "{what}: entrypoint");
    assert_eq!(strings(&config["Cmd"]), stage.cmd, "{what}: command");
    assert_eq!(config["StopSignal"].as_str(), stage.stop_signal.as_deref(), "{what}: stop signal");
    let ports: BTreeSet<String> =
        config["ExposedPorts"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    assert_eq!(ports, stage.ports, "{what}: exposed ports");

    for copied in &stage.copied {
        assert!(
            files.contains(copied),
            "{what}: {copied} is in the Dockerfile's image but not in the local one: {files:?}"
        );
    }
    let entry = &stage.entrypoint.clone().expect("the Dockerfile has an ENTRYPOINT")[0];
    assert!(
        files.contains(entry),
        "{what}: the entrypoint {entry} is not an executable in the local image"
    );
    // The numeric user runs whether or not it has a name; a named one needs /etc/passwd.
    let uid = stage
        .user
        .as_deref()
        .expect("the Dockerfile sets USER")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let passwd = config["passwd"].as_str().unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.split(':').nth(2) == Some(uid.as_str())),
        "{what}: uid {uid} has no /etc/passwd entry in the local image:\n{passwd}"
    );
}

#[test]
fn the_local_operator_image_matches_its_dockerfile() {
    check_agreement("operator", "operator.Dockerfile");
}

#[test]
fn the_local_agent_image_matches_its_dockerfile() {
    check_agreement("agent", "agent.Dockerfile");
}

#[test]
fn a_dockerfile_stage_is_read_as_docker_reads_it() {
    let stage = final_stage(
        "FROM a AS build\nUSER 1\nFROM b\n# comment\nCOPY --from=build /out/x \\\n  /out/y /usr/bin/\n\
         COPY --from=build /out/z /usr/bin/zz\nUSER 7:7\nEXPOSE 80 53/udp\nSTOPSIGNAL SIGINT\nENTRYPOINT [\"/usr/bin/x\"]\nCMD [\"run\"]\n",
    );
    assert_eq!(stage.user.as_deref(), Some("7:7"));
    assert_eq!(stage.copied, ["/usr/bin/x", "/usr/bin/y", "/usr/bin/zz"]);
    assert_eq!(stage.ports, BTreeSet::from(["80/tcp".to_string(), "53/udp".to_string()]));
    assert_eq!(stage.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(stage.entrypoint, Some(vec!["/usr/bin/x".to_string()]));
    assert_eq!(stage.cmd, Some(vec!["run".to_string()]));
}
