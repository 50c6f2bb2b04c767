//! The OpenAI-compatible server over real HTTP on loopback.
#![cfg(feature = "runtime")]

use std::sync::Arc;

use candle_core::Device;
use flotilla_engine::config::EngineConfig;
use flotilla_engine::metrics::{Metrics, ServeMetrics};
use flotilla_engine::model::Model;
use flotilla_engine::serve::batcher::Batcher;
use flotilla_engine::serve::{ServeState, router};
use serde_json::Value;

/// Starts a server with the tiny model on a free port; returns its address.
fn start_server() -> String {
    let config = EngineConfig::preset("tiny").expect("tiny");
    let model = Model::new(&config.model, 1, &Device::Cpu).expect("model");
    let metrics = Metrics::new();
    let serve_metrics = ServeMetrics::new(&metrics, "flotilla-moe").expect("metrics");
    let batcher = Batcher::spawn(model, 4, serve_metrics);
    let state = Arc::new(ServeState::new(batcher, "flotilla-moe".into(), 128, 8, metrics));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr").to_string()).expect("send addr");
            axum::serve(listener, router(state)).await.expect("serve");
        });
    });
    rx.recv().expect("address")
}

/// One HTTP request; returns (status, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .request(method, format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .expect("request");
    let status = response.status().as_u16();
    (status, response.text().expect("body"))
}

#[test]
fn completions_streaming_errors_and_metrics_over_http() {
    let addr = start_server();
    let (status, body) = request(&addr, "GET", "/health", "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(&addr, "GET", "/ready", "");
    assert_eq!(status, 200, "{body}");
    let (_, body) = request(&addr, "GET", "/v1/models", "");
    let models: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(models["data"][0]["id"], "flotilla-moe");

    let (status, body) = request(
        &addr,
        "POST",
        "/v1/completions",
        r#"{"model":"flotilla-moe","prompt":"The ship","max_tokens":5,"temperature":0}"#,
    );
    assert_eq!(status, 200, "{body}");
    let completion: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(completion["usage"]["completion_tokens"], 5);
    assert_eq!(completion["usage"]["prompt_tokens"], 8);
    assert_eq!(completion["choices"][0]["finish_reason"], "length");

    let chat = r#"{"messages":[{"role":"user","content":"hello"}],"max_tokens":4,"stream":true}"#;
    let (status, body) = request(&addr, "POST", "/v1/chat/completions", chat);
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let first: Value = serde_json::from_str(events[0]).expect("chunk json");
    assert_eq!(first["object"], "chat.completion.chunk");
    let last_chunk: Value = serde_json::from_str(events[events.len() - 2]).expect("chunk json");
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "length");

    for (path, body, want) in [
        ("/v1/completions", "{not json", 400),
        ("/v1/completions", r#"{"prompt":3}"#, 400),
        ("/v1/completions", r#"{"prompt":"x","model":"gpt-9"}"#, 404),
        ("/v1/chat/completions", r#"{"messages":[]}"#, 400),
    ] {
        let (status, text) = request(&addr, "POST", path, body);
        assert_eq!(status, want, "{body} -> {text}");
        let err: Value = serde_json::from_str(&text).expect("error body is JSON");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
    }

    // Concurrent requests are batched and all answered.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = format!(r#"{{"prompt":"request {i}","max_tokens":3}}"#);
                request(&addr, "POST", "/v1/completions", &body).0
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("client"), 200);
    }

    let (_, metrics) = request(&addr, "GET", "/metrics", "");
    assert!(
        metrics.contains("vllm:generation_tokens_total{model_name=\"flotilla-moe\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("vllm:time_to_first_token_seconds_bucket"), "{metrics}");
}

#[test]
fn stop_seed_top_p_logprobs_and_refusals_over_http() {
    let addr = start_server();
    let complete = |extra: &str| {
        let body = format!(r#"{{"prompt":"The ship","max_tokens":16{extra}}}"#);
        let (status, text) = request(&addr, "POST", "/v1/completions", &body);
        (status, serde_json::from_str::<Value>(&text).expect("json"))
    };
    let text_of = |v: &Value| v["choices"][0]["text"].as_str().expect("text").to_owned();

    let (_, greedy) = complete(r#","temperature":0"#);
    let full = text_of(&greedy);
    let stop: String = full.chars().skip(3).take(2).collect();
    let stop_json = serde_json::to_string(&stop).expect("json");
    let (status, stopped) = complete(&format!(r#","temperature":0,"stop":[{stop_json}]"#));
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(text_of(&stopped), full[..full.find(&stop).expect("stop in text")]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    let (_, a) = complete(r#","temperature":1,"seed":5"#);
    let (_, b) = complete(r#","temperature":1,"seed":5"#);
    assert_eq!(text_of(&a), text_of(&b), "the same seed samples the same text");
    let (_, nucleus) = complete(r#","temperature":1,"seed":5,"top_p":0.000001"#);
    assert_eq!(text_of(&nucleus), full, "a one-token nucleus is greedy");

    let (_, lp) = complete(r#","temperature":0,"logprobs":2"#);
    let logprobs = &lp["choices"][0]["logprobs"];
    assert_eq!(logprobs["token_logprobs"].as_array().map(Vec::len), Some(16), "{lp}");
    assert_eq!(logprobs["top_logprobs"][0].as_object().map(|m| m.len()), Some(2), "{lp}");

    for (extra, param) in [
        (r#","n":2"#, "n"),
        (r#","top_p":2"#, "top_p"),
        (r#","presence_penalty":1"#, "presence_penalty"),
        (r#","logprobs":9"#, "logprobs"),
    ] {
        let (status, err) = complete(extra);
        assert_eq!(status, 400, "{extra}: {err}");
        assert_eq!(err["error"]["param"], param, "{err}");
        let message = err["error"]["message"].as_str().expect("message");
        assert!(message.starts_with(&format!("field `{param}`: ")), "{message}");
    }
}
