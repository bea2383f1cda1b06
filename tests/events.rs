//! End-to-end: the event stream (`GET /v1/events`, `canopy events`) of a two-node local
//! cluster: events in order with ids that resume with `since` (query and SSE
//! `Last-Event-ID`), one node's events seen through the other, and a killed runner told with
//! its reason on both nodes.

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::common;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn events(base: &str, query: &str) -> Value {
    let mut r = agent()
        .get(format!("{base}/v1/events?follow=false{query}"))
        .call()
        .expect("events");
    assert_eq!(r.status(), 200);
    r.body_mut().read_json().expect("json")
}

fn list(v: &Value) -> Vec<Value> {
    v["events"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_nodes_events_are_seen_through_the_other_in_order_and_resume_where_a_reader_stopped() {
    let cluster = common::LocalCluster::start(2, &[]);
    let (first, second) = (cluster.base(0), cluster.base(1));
    let state: Value = agent()
        .get(format!("{first}/state"))
        .call()
        .expect("state")
        .body_mut()
        .read_json()
        .expect("json");
    let host = state["node"]
        .as_str()
        .expect("the first node's id")
        .to_string();

    // The runner on the first node started: the second node holds that event, in the first
    // node's name, and its own membership events besides.
    let seen = common::eventually_some(
        Duration::from_secs(20),
        "the runner's start on node 2",
        || {
            let all = list(&events(&second, ""));
            all.iter()
                .any(|e| e["kind"] == "runner_started" && e["node"] == host.as_str())
                .then_some(all)
        },
    )
    .expect("seen through the second node");
    let ids: Vec<u64> = seen.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
    assert!(
        seen.iter()
            .any(|e| e["kind"] == "member_joined" && e["node"] != host.as_str())
    );
    let next = events(&second, "")["next"].as_u64().expect("next");

    // A stream opened after `next` (Last-Event-ID, as a browser reconnects) gets the runner's
    // death first, with its reason, though it happened on the other node.
    let stream = agent()
        .get(format!("{second}/v1/events?kind=runner_failed"))
        .header("Last-Event-ID", next.to_string())
        .config()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .call()
        .expect("stream");
    let pid = state["local"]["instances"][0]["pid"]
        .as_u64()
        .or_else(|| state["instances"][0]["pid"].as_u64())
        .expect("the runner's pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the runner");
    let mut reader = BufReader::new(stream.into_body().into_reader());
    let mut line = String::new();
    let failed: Value = loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read") > 0,
            "the stream ended"
        );
        if let Some(data) = line.strip_prefix("data:") {
            break serde_json::from_str(data.trim()).expect("event json");
        }
    };
    assert_eq!(failed["kind"], "runner_failed");
    assert_eq!(failed["node"], host.as_str());
    assert_eq!(failed["pid"].as_u64(), Some(pid));
    assert!(failed["id"].as_u64().expect("id") > next);
    assert!(
        failed["message"]
            .as_str()
            .expect("message")
            .contains("signal 9"),
        "{failed}"
    );

    // `since` gives only what came after; the first node tells the same death as its own.
    let later = list(&events(&second, &format!("&since={next}")));
    assert!(later.iter().all(|e| e["id"].as_u64() > Some(next)));
    let on_host = list(&events(&first, "&kind=runner_failed"));
    assert_eq!(on_host.len(), 1, "{on_host:?}");
    assert_eq!(on_host[0]["seq"], failed["seq"]);

    // `canopy events` prints the same, one line each.
    let out = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args(["events", "--url", &second, "--kind", "runner_failed"])
        .output()
        .expect("canopy events");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("FAILURE runner of") && text.contains(&host[..8]),
        "{text}"
    );

    cluster.stop();
}
