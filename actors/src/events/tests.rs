use std::time::Duration;

use futures::StreamExt;

use super::*;

fn status(instance: &str, status: &str) -> EventBody {
    EventBody::RunnerStatus {
        instance: instance.into(),
        status: status.into(),
    }
}

fn peer_events(node: &str, incarnation: u64, seqs: impl IntoIterator<Item = u64>) -> Vec<Event> {
    seqs.into_iter()
        .map(|seq| Event {
            id: 99,
            node: node.into(),
            incarnation,
            seq,
            time_ms: 1,
            path: "worker/x".into(),
            body: status("x", &format!("s{seq}")),
        })
        .collect()
}

#[test]
fn events_are_read_in_order_from_any_cursor() {
    let log = EventLog::default();
    for n in 0..5 {
        log.record("worker/a", status("a", &n.to_string()));
    }
    let all = log.read(0, 100);
    assert_eq!(
        all.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(
        all.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!((all.missed, all.next), (0, 5));
    let rest = log.read(3, 100);
    assert_eq!(rest.events.iter().map(|e| e.id).collect::<Vec<_>>(), [4, 5]);
    let none = log.read(5, 100);
    assert!(none.events.is_empty());
    assert_eq!(none.next, 5);
    let two = log.read(0, 2);
    assert_eq!(two.next, 2);
}

#[test]
fn the_history_is_bounded_and_a_late_reader_is_told_what_it_missed() {
    let log = EventLog::new(Limits {
        max_events: 3,
        max_bytes: 1 << 20,
    });
    for n in 0..10 {
        log.record("worker/a", status("a", &n.to_string()));
    }
    assert_eq!(log.len(), 3);
    assert_eq!(log.dropped_counter().get(), 7);
    let read = log.read(2, 100);
    assert_eq!(read.missed, 5);
    assert_eq!(
        read.events.iter().map(|e| e.id).collect::<Vec<_>>(),
        [8, 9, 10]
    );

    let small = EventLog::new(Limits {
        max_events: 1000,
        max_bytes: 4096,
    });
    for _ in 0..100 {
        small.note("user", "x".repeat(500), false);
    }
    assert!(small.len() < 10, "held {}", small.len());
    assert!(!small.is_empty());
}

#[test]
fn a_cursor_from_an_earlier_run_of_the_node_reads_from_the_start() {
    let log = EventLog::default();
    log.record("a", status("a", "Ready"));
    let read = log.read(500, 100);
    assert_eq!(read.events.len(), 1);
}

#[test]
fn peers_events_are_taken_once_in_their_own_name_and_gaps_are_found() {
    let log = EventLog::default();
    log.set_node("me");
    assert!(log.absorb("b", peer_events("b", 7, 1..=3)).is_empty());
    // Sent again: skipped.
    assert!(log.absorb("b", peer_events("b", 7, 2..=3)).is_empty());
    assert_eq!(log.len(), 3);
    // In another node's name: refused.
    log.absorb("b", peer_events("c", 1, 1..=2));
    assert_eq!(log.len(), 3);
    // A gap: 4 and 5 never came.
    let gaps = log.absorb("b", peer_events("b", 7, [6]));
    assert_eq!(
        gaps,
        vec![Gap {
            node: "b".into(),
            incarnation: 7,
            after: 3
        }]
    );
    assert_eq!(log.held_of("b", 7), 3);
    // The missing ones arrive (a history answer): taken, the gap closes.
    assert!(log.absorb("b", peer_events("b", 7, 1..=6)).is_empty());
    assert_eq!(log.held_of("b", 7), 6);
    assert_eq!(log.len(), 6);
    // A restarted peer (a new incarnation) starts from 1 again and is not skipped.
    assert!(log.absorb("b", peer_events("b", 8, [1])).is_empty());
    assert_eq!(log.len(), 7);
    let read = log.read(0, 100);
    let ids: Vec<u64> = read.events.iter().map(|e| e.id).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6, 7], "local ids in arrival order");
    let seqs: Vec<u64> = read.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 6, 4, 5, 1]);
}

#[test]
fn a_peers_long_texts_are_cut() {
    let log = EventLog::default();
    let mut events = peer_events("b", 1, [1]);
    events[0].body = EventBody::RunnerFailed {
        instance: "i".into(),
        reason: "r".repeat(10_000),
        pid: 1,
        stderr_tail: vec!["line".into(); 500],
        failed_tasks: 0,
        will_restart: true,
    };
    events[0].path = "p".repeat(10_000);
    log.absorb("b", events);
    let event = log.read(0, 1).events[0].clone();
    assert_eq!(event.path.len(), MAX_PATH_LEN);
    let EventBody::RunnerFailed {
        reason,
        stderr_tail,
        ..
    } = &event.body
    else {
        panic!("{event:?}")
    };
    assert_eq!(reason.len(), MAX_EVENT_TEXT);
    assert_eq!(stderr_tail.len(), MAX_STDERR_LINES);
}

#[test]
fn own_history_answers_a_peer_from_where_it_stopped() {
    let log = EventLog::default();
    log.set_node("me");
    let (_, incarnation) = log.origin();
    for n in 0..4 {
        log.record("a", status("a", &n.to_string()));
    }
    log.absorb("b", peer_events("b", 1, [1]));
    let since: Vec<u64> = log
        .own_since(Some(incarnation), 2)
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(since, [3, 4]);
    let other: Vec<u64> = log
        .own_since(Some(incarnation + 1), 2)
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        other,
        [1, 2, 3, 4],
        "another incarnation gets everything held"
    );
}

#[test]
fn events_travel_in_message_pack_and_serve_as_json() {
    let log = EventLog::default();
    log.record(
        "worker/a",
        EventBody::RunnerFailed {
            instance: "a".into(),
            reason: "killed by signal 9".into(),
            pid: 42,
            stderr_tail: vec!["boom".into()],
            failed_tasks: 2,
            will_restart: true,
        },
    );
    let event = (*log.read(0, 1).events[0]).clone();
    let bytes = rmp_serde::to_vec_named(&event).unwrap();
    let back: Event = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(back, event);
    let json = event.to_json();
    assert_eq!(json["kind"], "runner_failed");
    assert_eq!(json["pid"], 42);
    assert_eq!(json["failure"], true);
    assert_eq!(
        json["message"],
        "runner of a (pid 42) killed by signal 9; 2 tasks failed; restarting it"
    );
    assert!(rmp_serde::from_slice::<Event>(b"\x93garbage").is_err());
}

#[tokio::test]
async fn follow_replays_the_history_then_waits_for_new_events() {
    let log = EventLog::default();
    log.record("a", status("a", "1"));
    log.record("a", status("a", "2"));
    let mut follow = Box::pin(log.follow(1));
    let Some(Followed::Event(e)) = follow.next().await else {
        panic!()
    };
    assert_eq!(e.id, 2);
    let waiting = tokio::time::timeout(Duration::from_millis(50), follow.next()).await;
    assert!(waiting.is_err(), "nothing new yet");
    log.record("a", status("a", "3"));
    let Some(Followed::Event(e)) = follow.next().await else {
        panic!()
    };
    assert_eq!(e.id, 3);
}

#[tokio::test]
async fn a_slow_follower_is_told_of_events_dropped_before_it_read_them() {
    let log = EventLog::new(Limits {
        max_events: 2,
        max_bytes: 1 << 20,
    });
    let mut follow = Box::pin(log.follow(0));
    for n in 0..5 {
        log.record("a", status("a", &n.to_string()));
    }
    assert!(matches!(follow.next().await, Some(Followed::Missed(3))));
    let Some(Followed::Event(e)) = follow.next().await else {
        panic!()
    };
    assert_eq!(e.id, 4);
}

#[tokio::test]
async fn follow_own_skips_peers_events() {
    let log = EventLog::default();
    log.set_node("me");
    let mut own = Box::pin(log.follow_own(0));
    log.absorb("b", peer_events("b", 1, [1]));
    log.record("a", status("a", "mine"));
    let e = own.next().await.unwrap();
    assert_eq!(e.node, "me");
}

#[test]
fn a_line_reads_at_a_glance() {
    assert_eq!(
        line(
            86_400_000 + 3_723_004,
            "1a2b3c4d5e6f",
            "worker/m",
            "it died",
            true
        ),
        "01:02:03.004Z 1a2b3c4d worker/m: FAILURE it died"
    );
    assert_eq!(
        line(0, "local", "cluster", "ok", false),
        "00:00:00.000Z local cluster: ok"
    );
}
