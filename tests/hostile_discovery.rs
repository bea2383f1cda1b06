//! Forged, replayed and oversized discovery beacons against real `canopy` nodes.
//!
//! Two `canopy node` processes form a cluster by multicast discovery in a network-namespace
//! fabric (`common::netns`); a third namespace is the attacker. It listens on a TCP port, joins
//! the discovery group to capture a real beacon, and sends to the nodes' discovery port (and to
//! the group): (a) a forged beacon, well formed but sealed under a key derived from another
//! cookie, naming the attacker's TCP listener; (b) the same with a real beacon's MAC over an
//! address changed to the listener; (c) a captured real beacon, replayed after the nodes heard it;
//! (d) an oversized datagram; (e) a version 1 beacon naming the listener. The nodes must never
//! connect to the listener, their membership must not change, and each drop must show in the log
//! (the drop counters are `ClusterHandle::dropped_beacons` / `discovery_counts`; the log lines
//! carry the running count of their reason). Last, a positive control: a beacon sealed with the
//! right cookie naming the listener does make a node dial it, so the negative checks above
//! would have seen a dial.
//!
//! Skipped (with a message) when not root.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common;
use crate::common::netns::{
    NODE_API_PORT, NODE_COOKIE, NodeCluster, NsNode, formed, master, node_id, peers, state,
};
use canopy_runtime::cluster::discovery::{
    BEACON_MAGIC, Beacon, BeaconInfo, DEFAULT_GROUP, DiscoveryKey, MAX_BEACON_LEN, decode_beacon,
    encode_beacon,
};

/// The namespace index of the attacker (nodes 0 and 1 run `canopy`).
const ATTACKER: usize = 2;
/// Discovery's drop lines for garbage are at `debug`; everything else at the default `info`.
const LOG_FILTER: &str = "info,canopy_runtime::cluster::discovery=debug";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn start(cluster: &NodeCluster, i: usize) -> NsNode {
    let args = cluster.node_args(i, &["--engine", "scripted"]);
    // The fabric is private to the test: no API key (the API serves the namespace's address).
    let env = [
        ("CANOPY_LOG".to_string(), LOG_FILTER.to_string()),
        ("CANOPY_INSECURE_NO_API_KEY".to_string(), "true".to_string()),
    ];
    let node = NsNode::spawn(&cluster.fabric, i, &args, &env, NODE_API_PORT);
    assert!(
        node.wait_http("/health", 200, Duration::from_secs(60)),
        "node {i} did not come up; log:\n{}",
        node.log_text()
    );
    node
}

fn logs(nodes: &[&NsNode]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- node {}:\n{}", n.index(), n.log_text()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `listener` (non-blocking) has had a connection.
fn was_dialed(listener: &TcpListener) -> Option<SocketAddr> {
    match listener.accept() {
        Ok((_, from)) => Some(from),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept on the attacker's listener: {e}"),
    }
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn forged_replayed_oversized_and_v1_beacons_are_dropped() {
    let t0 = Instant::now();
    let cluster = NodeCluster::new(3, "hostile");
    let fabric = &cluster.fabric;
    let namespace = cluster.namespace.clone();
    let group = DEFAULT_GROUP;
    let attacker = fabric.addr(ATTACKER);

    // The attacker's sockets, all in its namespace: a TCP listener the forged beacons name, a
    // sniffer joined to the discovery group, and a sender.
    let listener = fabric
        .in_ns(ATTACKER, || TcpListener::bind((attacker, 0)))
        .expect("attacker listener");
    listener.set_nonblocking(true).expect("non-blocking");
    let bait = listener.local_addr().expect("listener address");
    let sniffer = fabric.in_ns(ATTACKER, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, group.port())).expect("bind sniffer");
        s.join_multicast_v4(group.ip(), &attacker)
            .expect("join the discovery group");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s
    });
    let sender = fabric
        .in_ns(ATTACKER, || UdpSocket::bind((attacker, 0)))
        .expect("attacker sender");

    let a = start(&cluster, 0);
    let b = start(&cluster, 1);
    assert!(
        common::eventually(Duration::from_secs(20), "the condition", || formed(&[
            &a, &b
        ]))
        .is_ok(),
        "the two nodes did not form; {}",
        logs(&[&a, &b])
    );
    eprintln!("two nodes formed {:?} after the start", t0.elapsed());
    let (a_id, b_id) = (node_id(&a), node_id(&b));
    let master_before = master(&a);

    // Capture one of b's real beacons from the group.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 2048];
    let captured = loop {
        assert!(Instant::now() < deadline, "captured no beacon of b");
        let Ok((len, _)) = sniffer.recv_from(&mut buf) else {
            continue;
        };
        if let Ok(beacon) = decode_beacon(&buf[..len])
            && beacon.node_id == b_id
        {
            break (buf[..len].to_vec(), beacon);
        }
    };
    let (captured_bytes, captured_beacon) = captured;
    // Let both nodes hear that very datagram before it is replayed.
    std::thread::sleep(Duration::from_millis(300));

    // An id above both nodes' ids, so that either would dial it (the smaller id dials).
    let intruder_id = "f".repeat(32);
    let bait_info = BeaconInfo {
        node_id: intruder_id.clone(),
        addr: bait,
        started_ms: now_ms(),
    };
    let wrong_key = DiscoveryKey::derive("not-the-cookie", &namespace);
    let forged = || {
        encode_beacon(&Beacon::sealed(
            &namespace,
            &bait_info,
            now_ms(),
            &wrong_key,
        ))
        .expect("forged beacon")
    };
    let mut redirected = captured_beacon.clone();
    redirected.addr = bait;
    let redirected = encode_beacon(&redirected).expect("redirected beacon");
    let oversized = vec![0x90u8; MAX_BEACON_LEN + 100];
    // A version 1 beacon: the node reads magic and version first and refuses version 1 there,
    // whatever follows (the unit tests cover the exact version 1 layout).
    let mut v1 = Beacon::new(&namespace, &bait_info, now_ms());
    v1.version = 1;
    assert_eq!(v1.magic, BEACON_MAGIC);
    let v1 = encode_beacon(&v1).expect("v1 beacon");

    let targets = [
        SocketAddr::from((fabric.addr(0), group.port())),
        SocketAddr::from((fabric.addr(1), group.port())),
        SocketAddr::V4(SocketAddrV4::new(*group.ip(), group.port())),
    ];
    for round in 0..3 {
        for to in targets {
            sender.send_to(&forged(), to).expect("send forged");
            sender.send_to(&redirected, to).expect("send redirected");
            sender.send_to(&oversized, to).expect("send oversized");
            sender.send_to(&v1, to).expect("send v1");
        }
        // The replay goes to a alone (unicast), after it heard the original.
        sender
            .send_to(&captured_bytes, targets[0])
            .expect("send replay");
        if round < 2 {
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // Give the nodes time to (not) act: a node dials a newly discovered peer at once.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        was_dialed(&listener),
        None,
        "a node dialed the address of a forged beacon; {}",
        logs(&[&a, &b])
    );
    for node in [&a, &b] {
        let s = state(node);
        assert_eq!(peers(node), 1, "{s}");
        assert!(!s.to_string().contains(&intruder_id), "{s}");
        assert_eq!(master(node), master_before, "{s}");
    }
    assert_eq!(node_id(&a), a_id);

    // Every drop shows in a's log (with the running count of its reason).
    let log = a.log_text();
    for (what, needle) in [
        ("bad MAC", "failed authentication"),
        ("replay", "replayed beacon of node"),
        ("oversized", "exceeds the beacon limit"),
        ("version 1", "unsupported beacon version 1"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(needle) && l.contains("count=")),
            "no {what} drop ({needle:?}) in the log of node 0:\n{log}"
        );
    }
    assert!(
        b.log_text().contains("failed authentication"),
        "node 1 did not log the forged beacons:\n{}",
        b.log_text()
    );
    // ... and in its /metrics, by outcome.
    let metrics = match a.get("/metrics") {
        Ok((200, text)) => text,
        other => panic!("no metrics from node 0: {other:?}"),
    };
    for outcome in ["bad_mac", "replayed", "oversize", "version", "accepted"] {
        let series = format!("canopy_discovery_beacons_total{{outcome=\"{outcome}\"}}");
        let n = common::metric(&metrics, &series);
        assert!(n >= 1.0, "{series} is {n}:\n{metrics}");
    }

    // Positive control: the same bait sealed with the right cookie is dialed.
    let right_key = DiscoveryKey::derive(NODE_COOKIE, &namespace);
    let genuine = encode_beacon(&Beacon::sealed(
        &namespace,
        &bait_info,
        now_ms(),
        &right_key,
    ))
    .expect("genuine");
    sender.send_to(&genuine, targets[0]).expect("send genuine");
    let mut dialed = None;
    assert!(
        common::eventually(Duration::from_secs(5), "the condition", || {
            dialed = was_dialed(&listener);
            dialed.is_some()
        })
        .is_ok(),
        "an authentic beacon naming the listener was not dialed: the negative checks prove \
         nothing; {}",
        logs(&[&a])
    );
    assert_eq!(dialed.map(|d| d.ip()), Some(fabric.addr(0).into()));
    eprintln!("hostile discovery test done in {:?}", t0.elapsed());
}
