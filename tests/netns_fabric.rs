//! Self-test of the network-namespace fabric (`tests/common/netns.rs`): reachability between
//! nodes and nothing beyond, multicast without a multicast route, partitions, `ip netns exec`
//! execing, cleanup on drop, and a `canopy` node inside a namespace.
//!
//! Every test skips (passes after printing "skipping: ...") when not run as root.

use crate::common;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::netns::*;
use nix::sys::signal::Signal;

/// Connects from inside node `from` to `to` with `limit`.
fn connect(
    fabric: &Fabric,
    from: usize,
    to: SocketAddr,
    limit: Duration,
) -> std::io::Result<TcpStream> {
    fabric.in_ns(from, || TcpStream::connect_timeout(&to, limit))
}

/// The interface names of the namespace this process runs in.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn nodes_reach_each_other_and_nothing_else() {
    let before = interfaces();
    let t0 = Instant::now();
    let fabric = Fabric::new(2);
    eprintln!("2-node fabric up in {:?}", t0.elapsed());
    assert_eq!(fabric.nodes(), 2);
    assert_eq!(fabric.addr(0), Ipv4Addr::new(10, 213, 0, 1));
    assert_eq!(fabric.addr(1), Ipv4Addr::new(10, 213, 0, 2));
    assert_eq!(interfaces(), before, "the root namespace is untouched");

    // A listener opened inside node 0 stays in node 0's namespace after in_ns returns.
    let listener = fabric
        .in_ns(0, || TcpListener::bind((fabric.addr(0), 0)))
        .expect("listener in node 0");
    let to = listener.local_addr().expect("listener address");
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        s.write_all(b"pong!").expect("write");
        (peer, buf)
    });
    let t = Instant::now();
    let mut client = connect(&fabric, 1, to, Duration::from_secs(5)).expect("node 1 -> node 0");
    client.write_all(b"ping!").expect("write");
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply).expect("read");
    eprintln!("TCP round trip node 1 -> node 0 in {:?}", t.elapsed());
    assert_eq!(&reply, b"pong!");
    let (peer, got) = server.join().expect("server thread");
    assert_eq!(&got, b"ping!");
    assert_eq!(peer.ip(), fabric.addr(1));

    // No way out: no default route, so the kernel refuses at once.
    for i in 0..2 {
        let t = Instant::now();
        let err = connect(
            &fabric,
            i,
            "1.1.1.1:80".parse().expect("addr"),
            Duration::from_secs(5),
        )
        .expect_err("no internet from a node");
        assert_eq!(err.kind(), ErrorKind::NetworkUnreachable, "{err}");
        assert!(t.elapsed() < Duration::from_secs(1), "refused at once");
    }
}

/// Sets `IP_MULTICAST_IF` (the interface of outgoing multicast, by its address): std has no
/// setter for it, and neither has nix.
fn set_multicast_if(socket: &UdpSocket, addr: Ipv4Addr) -> std::io::Result<()> {
    let value = libc::in_addr {
        s_addr: u32::from_ne_bytes(addr.octets()),
    };
    // SAFETY: a valid fd and a pointer to an in_addr of the length given, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MULTICAST_IF,
            (&raw const value).cast(),
            std::mem::size_of::<libc::in_addr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn multicast_works_without_a_multicast_route() {
    let fabric = Fabric::new(3);
    let group = Ipv4Addr::new(239, 255, 41, 95);
    let port = 41_595;

    // What does not work without a route (printed, not asserted: kernel behaviour).
    fabric.in_ns(1, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        eprintln!(
            "join {group} on 0.0.0.0 (kernel picks the interface by route): {:?}",
            s.join_multicast_v4(&group, &Ipv4Addr::UNSPECIFIED)
        );
    });
    fabric.in_ns(0, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        eprintln!(
            "send to {group} from a socket on 0.0.0.0 without IP_MULTICAST_IF: {:?}",
            s.send_to(b"x", (group, port))
        );
    });

    // Receivers in nodes 1 and 2: bound to 0.0.0.0:port, joined on their own address.
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let receivers: Vec<_> = [1, 2]
            .into_iter()
            .map(|i| {
                let ready_tx = ready_tx.clone();
                let fabric = &fabric;
                scope.spawn(move || {
                    fabric.in_ns(i, || {
                        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
                        s.join_multicast_v4(&group, &fabric.addr(i))
                            .expect("join on the interface address");
                        s.set_read_timeout(Some(Duration::from_secs(5)))
                            .expect("timeout");
                        ready_tx.send(()).expect("ready");
                        let mut buf = [0u8; 64];
                        let (n, from) = s.recv_from(&mut buf).expect("a datagram from node 0");
                        (buf[..n].to_vec(), from, Instant::now())
                    })
                })
            })
            .collect();
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("receivers ready");
        }

        // The sender in node 0: IP_MULTICAST_IF set to its address is all it takes.
        let sent = fabric.in_ns(0, || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
            set_multicast_if(&s, fabric.addr(0)).expect("IP_MULTICAST_IF");
            let at = Instant::now();
            for _ in 0..3 {
                s.send_to(b"hello", (group, port))
                    .expect("send to the group");
                std::thread::sleep(Duration::from_millis(20));
            }
            at
        });
        for r in receivers {
            let (data, from, at) = r.join().expect("receiver");
            assert_eq!(data, b"hello");
            assert_eq!(from.ip(), fabric.addr(0));
            eprintln!("multicast delivered in {:?}", at.duration_since(sent));
        }
    });

    // Alternative: a sender bound to its unicast address (no IP_MULTICAST_IF) also works: the
    // kernel picks the interface that holds the source address. (A socket created in in_ns
    // stays in that namespace, so the receiver can be read from this thread.)
    let receiver = fabric.in_ns(1, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port + 1)).expect("bind");
        s.join_multicast_v4(&group, &fabric.addr(1)).expect("join");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s
    });
    fabric.in_ns(0, || {
        let s = UdpSocket::bind((fabric.addr(0), 0)).expect("bind");
        s.send_to(b"bound", (group, port + 1))
            .expect("send from a socket bound to the unicast address");
    });
    let mut buf = [0u8; 64];
    let (n, from) = receiver.recv_from(&mut buf).expect("datagram");
    assert_eq!(&buf[..n], b"bound");
    assert_eq!(from.ip(), fabric.addr(0));
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn cut_partitions_a_node_and_heal_restores_it() {
    let fabric = Fabric::new(3);
    let listener = fabric
        .in_ns(1, || TcpListener::bind((fabric.addr(1), 0)))
        .expect("listener in node 1");
    let to1 = listener.local_addr().expect("address");
    let listener2 = fabric
        .in_ns(2, || TcpListener::bind((fabric.addr(2), 0)))
        .expect("listener in node 2");
    let to2 = listener2.local_addr().expect("address");
    let short = Duration::from_millis(500);

    connect(&fabric, 0, to1, short).expect("reachable before the cut");
    fabric.cut(1);
    let t = Instant::now();
    let err = connect(&fabric, 0, to1, short).expect_err("node 1 cut off");
    eprintln!(
        "after cut: {err} ({:?}) after {:?}",
        err.kind(),
        t.elapsed()
    );
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::HostUnreachable),
        "{err}"
    );
    assert!(
        connect(&fabric, 1, to2, short).is_err(),
        "node 1 cannot reach out either"
    );
    connect(&fabric, 0, to2, short).expect("nodes 0 and 2 unaffected");
    // The cut node still reaches itself (how NsNode talks to its API).
    connect(&fabric, 1, to1, short).expect("node 1 reaches itself");

    fabric.heal(1);
    // The bridge forwards at once, but a node's ARP entry left INCOMPLETE by an attempt during
    // the cut is only probed again on the kernel's 1 s neighbour timer: allow for it.
    let healed = Instant::now();
    for (from, to, what) in [(0, to1, "0 -> 1"), (1, to2, "1 -> 2"), (2, to1, "2 -> 1")] {
        let deadline = healed + Duration::from_secs(10);
        loop {
            match connect(&fabric, from, to, short) {
                Ok(_) => break,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{what} still cut after heal: {e}"
                ),
            }
        }
        eprintln!("{what} reachable again {:?} after heal", healed.elapsed());
    }
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn command_execs_the_program_inside_the_namespace() {
    let fabric = Fabric::new(1);
    let mut child = fabric
        .command(0, "sleep")
        .arg("1000")
        .spawn()
        .expect("sleep starts");
    let pid = child.id();
    let ns_inode = std::fs::metadata(format!("/run/netns/{}", fabric.ns(0)))
        .expect("netns file")
        .ino();
    // `ip netns exec` execs: the same pid becomes `sleep` in the namespace.
    common::eventually(Duration::from_secs(5), "the child to exec sleep", || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    })
    .expect("the child became sleep");
    let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("ns of the child")
        .ino();
    assert_eq!(inode, ns_inode, "the child runs in node 0's namespace");
    assert_eq!(fabric.pids(0), vec![pid]);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM)
        .expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status}");
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn drop_removes_namespaces_and_processes() {
    let fabric = Fabric::new(2);
    let prefix = fabric.prefix().to_string();
    assert_eq!(
        leftover_namespaces(&prefix).len(),
        3,
        "switch and two nodes"
    );
    let mut sleeper = fabric
        .command(0, "sleep")
        .arg("1000")
        .spawn()
        .expect("sleep starts");
    // A process that is not our child: started by a shell that exits at once.
    let mut shell = fabric
        .command(1, "sh")
        .args(["-c", "sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh starts");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("pid line");
    let orphan: u32 = line.trim().parse().expect("a pid");
    shell.wait().expect("sh exits");
    assert!(common::alive(orphan), "the orphan sleeps");

    let t = Instant::now();
    drop(fabric);
    eprintln!("fabric dropped in {:?}", t.elapsed());
    assert_eq!(leftover_namespaces(&prefix), Vec::<String>::new());
    let status = sleeper.wait().expect("wait");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32), "{status}");
    assert!(
        common::wait_gone(orphan, Duration::from_secs(5)),
        "orphan {orphan} survived"
    );
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn fabrics_run_concurrently() {
    let t = Instant::now();
    let fabrics: Vec<Fabric> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|_| s.spawn(|| Fabric::new(2))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fabric thread"))
            .collect()
    });
    eprintln!("3 fabrics of 2 nodes up in {:?}", t.elapsed());
    let mut prefixes: Vec<&str> = fabrics.iter().map(Fabric::prefix).collect();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 3, "distinct names");
    // The same addresses in every fabric, and no crosstalk: each has its own switch.
    let listener = fabrics[0]
        .in_ns(0, || TcpListener::bind((fabrics[0].addr(0), 0)))
        .expect("listener");
    let to = listener.local_addr().expect("address");
    connect(&fabrics[0], 1, to, Duration::from_secs(2)).expect("same fabric");
    assert!(connect(&fabrics[1], 1, to, Duration::from_millis(300)).is_err());
}

#[test]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (network namespaces); CI runs the suite as root"
)]
fn a_canopy_node_serves_http_inside_its_namespace() {
    let fabric = Fabric::new(2);
    let port = 52_415;
    let t = Instant::now();
    let mut nodes: Vec<NsNode> = (0..2)
        .map(|i| {
            let args: Vec<String> = [
                "node",
                "--host",
                &fabric.addr(i).to_string(),
                "--port",
                &port.to_string(),
                "--standalone",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            NsNode::spawn(&fabric, i, &args, &[], port)
        })
        .collect();
    for node in &nodes {
        assert_eq!(node.base(), format!("http://{}:{port}", node.addr()));
        assert!(
            node.wait_http("/health", 200, Duration::from_secs(60)),
            "node {} not healthy; log:\n{}",
            node.index(),
            node.log_text()
        );
        assert!(
            fabric.pids(node.index()).contains(&node.pid()),
            "the pid is canopy's, inside the namespace"
        );
    }
    eprintln!(
        "two canopy nodes on the same port healthy in {:?}",
        t.elapsed()
    );
    // A cut node still answers through its own namespace.
    fabric.cut(1);
    let (status, _) = nodes[1].get("/health").expect("health while cut");
    assert_eq!(status, 200);
    fabric.heal(1);

    nodes[0].signal(Signal::SIGINT).expect("SIGINT");
    let status = nodes[0]
        .wait_exit(Duration::from_secs(30))
        .expect("exits after SIGINT");
    assert!(status.success(), "{status}; log:\n{}", nodes[0].log_text());
    assert!(nodes[0].exited());
    nodes[1].kill();
    assert!(nodes[1].exited());
}
