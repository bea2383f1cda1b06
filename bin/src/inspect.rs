//! `canopy inspect`: the live supervision tree of a running node.
//!
//! Reads `GET /v1/actors` (every actor registers itself; nothing here knows the tree's
//! shape) and prints one line per actor: name, kind, status, uptime, restarts, and the
//! details the actor reports (for runners: the OS pid, heartbeat age and current task, and
//! once the runner reported its batch: sequences running of `parallel`, tasks queued, KV
//! memory in use of its capacity, prefix-cache hits and reused tokens).
//! Mailbox depth is not shown: ractor does not expose it. `--json` prints the raw tree;
//! `--watch` redraws it every interval. On a cluster member it shows every node's tree
//! (`GET /v1/cluster/actors`), the master marked.

use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::{DEFAULT_URL, get_json};

/// Options of `canopy inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The node's API URL.
    #[arg(long, env = "CANOPY_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Print the tree as JSON.
    #[arg(long)]
    json: bool,
    /// Redraw every SECONDS (Ctrl-C to stop).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "1")]
    watch: Option<f64>,
}

/// Runs `canopy inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    loop {
        // A cluster member answers with every node's tree; a standalone node has only its own.
        let tree = match get_json(&args.url, "/v1/cluster/actors") {
            Ok(cluster) if cluster["nodes"].is_array() => cluster,
            _ => get_json(&args.url, "/v1/actors")?,
        };
        let out = if args.json {
            serde_json::to_string_pretty(&tree)?
        } else if let Some(nodes) = tree["nodes"].as_array() {
            render_cluster(nodes)
        } else {
            render(&tree)
        };
        match args.watch {
            Some(secs) => {
                // Clear the screen and home the cursor, then draw.
                print!("\x1b[2J\x1b[H{out}");
                println!();
                std::thread::sleep(Duration::from_secs_f64(secs.max(0.1)));
            }
            None => {
                println!("{out}");
                return Ok(());
            }
        }
    }
}

/// Bytes as MiB, one decimal.
fn human_mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A runner's batch report (`details.batch`) on one line: `running=R/P queued=Q
/// kv=USED/CAPACITY prefix_hits=H reused_tokens=T`.
fn batch_summary(batch: &Value) -> String {
    let n = |key: &str| batch[key].as_u64().unwrap_or(0);
    format!(
        "running={}/{} queued={} kv={}/{} prefix_hits={} reused_tokens={}",
        n("running"),
        n("parallel"),
        n("queued"),
        human_mib(n("kv_bytes")),
        human_mib(n("kv_capacity_bytes")),
        n("prefix_hits"),
        n("prefix_reused_tokens"),
    )
}

fn human_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1e3),
        60_000..3_600_000 => format!("{}m{}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

/// Every node's tree, one after the other, each under a header line.
pub fn render_cluster(nodes: &[Value]) -> String {
    let mut out = String::new();
    for node in nodes {
        let id = node["node"].as_str().unwrap_or("?");
        let role = if node["master"].as_bool() == Some(true) {
            " (master)"
        } else {
            ""
        };
        let _ = writeln!(out, "node {id}{role}");
        if node["tree"].is_null() {
            let why = node["error"].as_str().unwrap_or("no answer");
            let _ = writeln!(out, "  (tree unavailable: {why})");
        } else {
            for l in render(&node["tree"]).lines() {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
    out
}

/// The tree as indented text.
pub fn render(tree: &Value) -> String {
    let mut out = String::new();
    line(&mut out, tree, "", true, true);
    out
}

fn line(out: &mut String, actor: &Value, prefix: &str, last: bool, root: bool) {
    let name = actor["child_id"]
        .as_str()
        .or(actor["name"].as_str())
        .unwrap_or_else(|| actor["id"].as_str().unwrap_or("?"));
    let kind = actor["kind"].as_str().unwrap_or("actor");
    let status = actor["status"].as_str().unwrap_or("?");
    let branch = if root {
        ""
    } else if last {
        "└── "
    } else {
        "├── "
    };
    let _ = write!(out, "{prefix}{branch}{name} [{kind}] {status}");
    if let Some(ms) = actor["uptime_ms"].as_u64() {
        let _ = write!(out, " up {}", human_ms(ms));
    }
    let _ = write!(out, " restarts {}", actor["restarts"].as_u64().unwrap_or(0));
    if let Value::Object(details) = &actor["details"] {
        for (key, value) in details {
            if value.is_null() {
                continue;
            }
            if key == "batch" && value.is_object() {
                let _ = write!(out, " {}", batch_summary(value));
                continue;
            }
            match (key.strip_suffix("_ms"), value.as_u64()) {
                (Some(k), Some(ms)) => {
                    let _ = write!(out, " {k}={}", human_ms(ms));
                }
                _ => {
                    let v = value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string);
                    let _ = write!(out, " {key}={v}");
                }
            }
        }
    }
    out.push('\n');
    let children = actor["children"].as_array().cloned().unwrap_or_default();
    let child_prefix = if root {
        String::new()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    for (i, child) in children.iter().enumerate() {
        line(out, child, &child_prefix, i + 1 == children.len(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_tree_with_details() {
        let tree = serde_json::json!({
            "id": "0.1", "name": null, "child_id": null, "kind": "node", "status": "Running",
            "uptime_ms": 65000, "restarts": 0, "details": null,
            "children": [{
                "id": "0.2", "name": "runner:m-0", "child_id": "runner:m-0",
                "kind": "runner-supervisor", "status": "Running", "uptime_ms": 500,
                "restarts": 1, "details": {"pid": 42, "status": "Ready", "last_heartbeat_age_ms": 40},
                "children": []
            }]
        });
        let text = render(&tree);
        assert!(
            text.starts_with("0.1 [node] Running up 1m5s restarts 0\n"),
            "{text}"
        );
        assert!(
            text.contains("└── runner:m-0 [runner-supervisor] Running up 500ms restarts 1"),
            "{text}"
        );
        assert!(
            text.contains("pid=42") && text.contains("last_heartbeat_age=40ms"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_runner_batch() {
        let tree = serde_json::json!({
            "id": "0.2", "kind": "runner-supervisor", "status": "Running", "restarts": 0,
            "details": {"pid": 42, "batch": {
                "parallel": 8, "running": 3, "queued": 2, "last_step_rows": 3,
                "kv_bytes": 12 * 1024 * 1024 + 512 * 1024, "kv_capacity_bytes": 512u64 << 20,
                "prefix_hits": 5, "prefix_reused_tokens": 640, "prefilled_tokens": 900
            }},
            "children": []
        });
        let text = render(&tree);
        assert!(
            text.contains(
                "running=3/8 queued=2 kv=12.5MiB/512.0MiB prefix_hits=5 reused_tokens=640"
            ),
            "{text}"
        );
        assert!(!text.contains("batch="), "{text}");
    }
}
