//! Cluster membership in one process: two or three `ClusterActor`s on loopback ports, joined
//! by static peers. (Discovery, freezing and partitions are covered end to end with real
//! processes in network namespaces: tests/cluster.rs.)

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use canopy_runtime::cluster::{
    ClusterActor, ClusterConfig, ClusterHandle, ClusterView, Incoming, NodeId, cluster_channels,
};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

struct Node {
    actor: ActorRef<canopy_runtime::cluster::ClusterMsg>,
    handle: ClusterHandle,
    incoming: mpsc::UnboundedReceiver<Incoming>,
}

async fn start(cookie: &str, listen: SocketAddr, peers: Vec<SocketAddr>, started_ms: u64) -> Node {
    let mut config = ClusterConfig::new(NodeId::random(), listen, cookie.to_string());
    config.peers = peers;
    config.started_ms = started_ms;
    let (args, handle, incoming) = cluster_channels(config);
    let (actor, _) = Actor::spawn(None, ClusterActor, args)
        .await
        .expect("cluster starts");
    Node {
        actor,
        handle,
        incoming,
    }
}

async fn wait_view(node: &Node, what: &str, ok: impl Fn(&ClusterView) -> bool) -> ClusterView {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = node.handle.view();
        if ok(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_join_elect_the_senior_one_and_exchange_messages() {
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let a = start("secret", a_addr, vec![b_addr], 1_000).await;
    let mut b = start("secret", b_addr, vec![a_addr], 2_000).await;
    let va = wait_view(&a, "a sees b and leads", |v| {
        v.members.len() == 1 && v.is_leader()
    })
    .await;
    let vb = wait_view(&b, "b follows a", |v| {
        v.members.len() == 1 && v.leader.as_ref() == Some(a.handle.me())
    })
    .await;
    assert_eq!(va.members[0].id, *b.handle.me());
    assert!(vb.term >= va.term.min(1));

    // Application messages: a cast and a call.
    a.handle
        .send(b.handle.me(), b"hello".to_vec())
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), b.incoming.recv())
        .await
        .expect("in time")
        .expect("message");
    assert_eq!(got.payload, b"hello");
    assert_eq!(got.from, *a.handle.me());
    let answer = tokio::spawn({
        let h = a.handle.clone();
        let to = b.handle.me().clone();
        async move { h.call(&to, b"ping".to_vec(), Duration::from_secs(5)).await }
    });
    let call = tokio::time::timeout(Duration::from_secs(5), b.incoming.recv())
        .await
        .expect("in time")
        .expect("call");
    assert_eq!(call.payload, b"ping");
    call.reply
        .expect("a reply port")
        .send(b"pong".to_vec())
        .expect("reply");
    assert_eq!(answer.await.expect("join").expect("answer"), b"pong");

    // a stops: b sees it leave at once (the connection closes) and takes the lead.
    let t = Instant::now();
    a.actor.stop(None);
    wait_view(&b, "b alone and leading", |v| {
        v.members.is_empty() && v.is_leader()
    })
    .await;
    eprintln!("peer stop noticed and re-elected in {:?}", t.elapsed());
    b.actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cookie_is_refused() {
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let a = start("right", a_addr, vec![], 1_000).await;
    let b = start("wrong", b_addr, vec![a_addr], 2_000).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(a.handle.view().members.is_empty(), "{:?}", a.handle.view());
    assert!(b.handle.view().members.is_empty(), "{:?}", b.handle.view());
    assert!(a.handle.send(b.handle.me(), vec![1]).is_err());
    a.actor.stop(None);
    b.actor.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_arrive_whole_in_chunks_and_oversized_ones_are_refused() {
    use canopy_runtime::cluster::chunk::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let a = start("secret", a_addr, vec![b_addr], 1_000).await;
    let mut b = start("secret", b_addr, vec![a_addr], 2_000).await;
    wait_view(&b, "b follows a", |v| {
        v.members.len() == 1 && v.leader.as_ref() == Some(a.handle.me())
    })
    .await;
    // Big and small messages interleaved: each arrives whole, in the order sent.
    let sizes = [
        3 * CHUNK_BYTES + 11,
        5,
        CHUNK_BYTES,
        CHUNK_BYTES + 1,
        MAX_MESSAGE_BYTES,
        0,
    ];
    let payloads: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(n, &len)| (0..len).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    for p in &payloads {
        a.handle.send(b.handle.me(), p.clone()).expect("send");
    }
    for p in &payloads {
        let got = tokio::time::timeout(Duration::from_secs(20), b.incoming.recv())
            .await
            .expect("in time")
            .expect("message");
        assert_eq!(got.from, *a.handle.me());
        assert_eq!(got.payload.len(), p.len());
        assert!(
            got.payload == *p,
            "a {}-byte payload came back altered",
            p.len()
        );
    }
    let err = a
        .handle
        .send(b.handle.me(), vec![0; MAX_MESSAGE_BYTES + 1])
        .expect_err("too large");
    assert!(err.to_string().contains("limit"), "{err}");
    // The session survived all of it.
    a.handle
        .send(b.handle.me(), b"still here".to_vec())
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), b.incoming.recv())
        .await
        .expect("in time")
        .expect("message");
    assert_eq!(got.payload, b"still here");
    assert_eq!(b.handle.view().members.len(), 1);
    a.actor.stop(None);
    b.actor.stop(None);
}
