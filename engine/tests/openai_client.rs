//! The official `openai` Python client against a real `flotilla-worker serve` process: each
//! OpenAI request parameter is honoured or refused by name (the checks are in
//! `openai_client.py` beside this file).
//!
//! The interpreter is `FLOTILLA_PYTHON` (scripts/test.sh sets it), else the one
//! `scripts/python-env.sh` prints (a cached venv with the pinned `openai`). Without Python or the
//! package the test fails: it never skips.
#![cfg(feature = "runtime")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The worker, killed when the test ends however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The Python with the `openai` package, or a panic that says how to get it.
fn python() -> String {
    if let Ok(python) = std::env::var("FLOTILLA_PYTHON") {
        return python;
    }
    let script = workspace().join("scripts/python-env.sh");
    let out = Command::new("bash").arg(&script).output().expect("running scripts/python-env.sh");
    assert!(
        out.status.success(),
        "this test needs Python with the `openai` package: `bash {}` failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("python-env.sh prints the interpreter").trim().to_owned()
}

#[test]
fn the_official_openai_client_gets_each_parameter_honoured_or_refused_by_name() {
    let python = python();
    let probe =
        Command::new(&python).args(["-c", "import openai; print(openai.__version__)"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{python} cannot import `openai` (run `bash scripts/python-env.sh` and set \
             FLOTILLA_PYTHON to the path it prints):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run {python} ({e}); run `bash scripts/setup.sh`"),
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-worker"))
        .args(["serve", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0"])
        .args(["--model-name", "flotilla-moe", "--max-batch-size", "4"])
        .env_remove("FLOTILLA_CHECKPOINT_DIR")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn flotilla-worker serve");
    let stdout = child.stdout.take().expect("stdout");
    let server = Server(child);
    // Read stdout to its end, so the server never writes into a closed pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("flotilla-worker serve printed no `listening on ADDR`");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("http://{addr}/v1"))
        .arg("flotilla-moe")
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("running openai_client.py");
    drop(server);
    let report =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "the openai client checks failed:\n{report}");
    assert!(report.contains(" passed, 0 failed"), "{report}");
}
