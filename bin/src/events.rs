//! `canopy events`: the event stream of a running node (every node's, on a cluster member),
//! one readable line per event: restarts, runner deaths with their reason, membership,
//! elections, placements.
//!
//! Without `--follow` it prints the events the node holds and exits; with it, it goes on
//! printing each new event, and resumes where it stopped (`since`) when the connection
//! breaks. `--json` prints each event as one JSON object per line.

use std::io::Write as _;
use std::time::Duration;

use clap::Args;
use serde_json::Value;

use crate::client::{DEFAULT_URL, get_json, get_lines};

/// Options of `canopy events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// The node's API URL.
    #[arg(long, env = "CANOPY_URL", default_value = DEFAULT_URL)]
    url: String,
    /// Keep printing new events as they happen (Ctrl-C to stop).
    #[arg(long, short)]
    follow: bool,
    /// Print each event as one line of JSON.
    #[arg(long)]
    json: bool,
    /// Only events after this id.
    #[arg(long, value_name = "ID", default_value_t = 0)]
    since: u64,
    /// Only the events of this node (its id, or the first characters of it).
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Only events of these kinds (comma-separated: runner_failed,member_left,...).
    #[arg(long, value_name = "KINDS")]
    kind: Option<String>,
}

/// The text `canopy events` prints for one event.
fn render(event: &Value, json: bool) -> String {
    if json {
        return event.to_string();
    }
    canopy_actors::events::line(
        event["time_ms"].as_u64().unwrap_or(0),
        event["node"].as_str().unwrap_or("?"),
        event["path"].as_str().unwrap_or("?"),
        event["message"].as_str().unwrap_or(""),
        event["failure"].as_bool().unwrap_or(false),
    )
}

fn query(args: &EventsArgs, since: u64, follow: bool) -> String {
    let mut q = format!("/v1/events?since={since}&follow={follow}");
    for (key, value) in [("node", &args.node), ("kind", &args.kind)] {
        if let Some(v) = value {
            q.push_str(&format!("&{key}={}", encode(v)));
        }
    }
    q
}

/// Percent-encodes what is not a letter, digit or one of `-_.,`.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `canopy events`.
pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if !args.follow {
        let answer = get_json(&args.url, &query(&args, args.since, false))?;
        for event in answer["events"].as_array().into_iter().flatten() {
            writeln!(out, "{}", render(event, args.json))?;
        }
        if let Some(missed) = answer["missed"].as_u64().filter(|n| *n > 0) {
            eprintln!("({missed} earlier events are no longer held by the node)");
        }
        return Ok(());
    }
    let mut since = args.since;
    let mut failures = 0u32;
    loop {
        let mut id = None;
        let mut kind = None;
        let result = get_lines(&args.url, &query(&args, since, true), |line| {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse::<u64>().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = Some(v.trim().to_string());
            } else if let Some(data) = line.strip_prefix("data:") {
                let value: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                if kind.as_deref() == Some("missed") {
                    eprintln!(
                        "({} events were dropped before they could be read)",
                        value["missed"]
                    );
                } else if value.is_object() {
                    writeln!(out, "{}", render(&value, args.json))?;
                    out.flush()?;
                }
            } else if line.is_empty() {
                if let Some(i) = id.take() {
                    since = i;
                }
                kind = None;
                failures = 0;
            }
            Ok(())
        });
        // The stream ended (the node stopped, or the connection broke): resume from the
        // last event printed, giving up after a minute without the node.
        failures += 1;
        if failures > 60 {
            return result.and(Err(anyhow::anyhow!("the node at {} went away", args.url)));
        }
        if let Err(err) = &result
            && failures == 1
        {
            eprintln!("({err}; retrying)");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_as_lines_or_json() {
        let event = serde_json::json!({"time_ms": 3_723_004u64, "node": "1a2b3c4d5e6f", "path": "worker/m",
            "message": "it died", "failure": true, "kind": "runner_failed"});
        assert_eq!(
            render(&event, false),
            "01:02:03.004Z 1a2b3c4d worker/m: FAILURE it died"
        );
        assert_eq!(render(&event, true), event.to_string());
        assert_eq!(encode("runner_failed,a b"), "runner_failed,a%20b");
    }
}
