//! Dialing: which known addresses to dial now (static peers and discovered ones, with a
//! doubling backoff per address), and starting the dials.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ractor::ActorRef;

use super::{ClusterMsg, ClusterState, DialFailure};
use crate::cluster::discovery::should_dial;
use crate::cluster::tls::ClusterTls;
use crate::restart::Backoff;
use ractor_cluster::ClientConnectErr;

pub(super) struct Dial {
    pub(super) failures: u32,
    pub(super) next: Instant,
    pub(super) in_flight: bool,
    /// A failed TLS handshake was logged since the last successful dial.
    pub(super) tls_warned: bool,
}

/// The wait before redialling a peer after `failures` failed dials: 250 ms doubling to 5 s.
pub(super) fn backoff(failures: u32) -> Duration {
    Backoff::doubling(Duration::from_millis(250), Duration::from_secs(5)).delay(failures)
}

impl ClusterState {
    /// Addresses worth a dial now.
    pub(super) fn due_dials(&mut self) -> Vec<SocketAddr> {
        let connected: Vec<SocketAddr> = self
            .peers
            .values()
            .filter_map(|p| p.beat.as_ref().map(|b| b.addr))
            .chain(
                self.sessions
                    .values()
                    .filter_map(|s| s.peer_addr.parse().ok()),
            )
            .collect();
        let me = self.me().clone();
        let listen = self.config().listen;
        let mut wanted: Vec<SocketAddr> = self.config().peers.clone();
        wanted.extend(
            self.known
                .iter()
                .filter(|(id, _)| {
                    !self.peers.contains_key(*id) && should_dial(me.as_str(), id.as_str())
                })
                .map(|(_, (addr, _))| *addr),
        );
        // Dial state of addresses no longer wanted (a node that went away) is forgotten.
        self.dials
            .retain(|addr, d| d.in_flight || wanted.contains(addr));
        let now = Instant::now();
        let mut due = Vec::new();
        for addr in wanted {
            if addr == listen || connected.contains(&addr) || due.contains(&addr) {
                continue;
            }
            let dial = self.dials.entry(addr).or_insert(Dial {
                failures: 0,
                next: now,
                in_flight: false,
                tls_warned: false,
            });
            if !dial.in_flight && dial.next <= now {
                dial.in_flight = true;
                due.push(addr);
            }
        }
        due
    }

    pub(super) fn dial(&mut self, myself: &ActorRef<ClusterMsg>) {
        for addr in self.due_dials() {
            let server = self.server.clone();
            let myself = myself.clone();
            let limit = self.config().dial_timeout;
            let tls = self.config().tls.clone();
            tokio::spawn(async move {
                let connect = async {
                    match tls {
                        Some(tls) => {
                            ractor_cluster::client_connect_enc(
                                &server,
                                addr,
                                tls.connector(),
                                ClusterTls::server_name(),
                            )
                            .await
                        }
                        None => ractor_cluster::client_connect(&server, addr).await,
                    }
                };
                let outcome = match tokio::time::timeout(limit, connect).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(ClientConnectErr::Encryption(e))) => {
                        Err(DialFailure::Tls(e.to_string()))
                    }
                    Ok(Err(e)) => Err(DialFailure::Connect(e.to_string())),
                    Err(_) => Err(DialFailure::Connect(format!("no answer within {limit:?}"))),
                };
                let _ = myself.cast(ClusterMsg::Dialed(addr, outcome));
            });
        }
    }
}
