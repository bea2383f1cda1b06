// Copyright (c) Sean Lawlor
//
// This source code is licensed under both the MIT license found in the
// LICENSE-MIT file in the root directory of this source tree.

//! TCP Server to accept incoming sessions

use std::net::IpAddr;

use ractor::cast;
use ractor::Actor;
use ractor::ActorProcessingErr;
use ractor::ActorRef;
use tokio::net::TcpListener;

use super::IncomingEncryptionMode;
use crate::node::NodeServerMessage;

/// A Tcp Socket [Listener] responsible for accepting new connections and spawning [super::session::Session]s
/// which handle the message sending and receiving over the socket.
///
/// The [Listener] supervises all of the TCP [super::session::Session] actors and is responsible for logging
/// connects and disconnects as well as tracking the current open [super::session::Session] actors.
pub(crate) struct Listener {
    port: super::NetworkPort,
    session_manager: ActorRef<crate::node::NodeServerMessage>,
    encryption: IncomingEncryptionMode,
    listen_addr: Option<IpAddr>,
    tls_timeout: std::time::Duration,
}

impl Listener {
    /// Create a new `Listener`
    pub(crate) fn new(
        port: super::NetworkPort,
        session_manager: ActorRef<crate::node::NodeServerMessage>,
        encryption: IncomingEncryptionMode,
        listen_addr: Option<IpAddr>,
        tls_timeout: std::time::Duration,
    ) -> Self {
        Self {
            port,
            session_manager,
            encryption,
            listen_addr,
            tls_timeout,
        }
    }
}

/// The Node listener's state
pub(crate) struct ListenerState {
    listener: Option<TcpListener>,
}

#[derive(crate::RactorMessage)]
pub(crate) struct ListenerMessage;

#[cfg_attr(feature = "async-trait", ractor::async_trait)]
impl Actor for Listener {
    type Msg = ListenerMessage;
    type Arguments = ActorRef<NodeServerMessage>;
    type State = ListenerState;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        node_server: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let listener = if let Some(addr) = self.listen_addr {
            // User-specified bind address — bind directly
            let addr = std::net::SocketAddr::new(addr, self.port);
            TcpListener::bind(addr).await?
        } else {
            // Default: create a dual-stack IPv6 socket so that both IPv4 and IPv6
            // connections are accepted. On Linux IPV6_V6ONLY defaults to false, but
            // on Windows it defaults to true, so we must set it explicitly.
            use socket2::{Domain, Protocol, Socket, Type};

            let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            let addr =
                std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, self.port, 0, 0);
            socket.bind(&addr.into())?;
            socket.listen(128)?;
            TcpListener::from_std(std::net::TcpListener::from(socket))?
        };

        // If the used port differs from the user-specified port, inform the node server.
        let local_addr = listener.local_addr()?;
        if local_addr.port() != self.port {
            node_server.send_message(NodeServerMessage::PortChanged {
                port: local_addr.port(),
            })?;
        }

        // startup the event processing loop by sending an initial msg
        let _ = myself.cast(ListenerMessage);

        // create the initial state
        Ok(Self::State {
            listener: Some(listener),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // close the listener properly, in case anyone else has handles to the actor stopping
        // total droppage
        drop(state.listener.take());
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(listener) = &mut state.listener {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    stream.set_nodelay(true)?;
                    let local = stream.local_addr()?;

                    match &self.encryption {
                        IncomingEncryptionMode::Raw => {
                            let stream = super::NetworkStream::Raw {
                                peer_addr: addr,
                                local_addr: local,
                                stream,
                            };
                            let _ = cast!(
                                self.session_manager,
                                NodeServerMessage::ConnectionOpened {
                                    stream: Box::new(stream),
                                    is_server: true
                                }
                            );
                            tracing::info!("TCP Session opened for {addr}");
                        }
                        IncomingEncryptionMode::Tls(acceptor) => {
                            // The TLS handshake runs in its own task, under a deadline: run
                            // inline, one peer that connects and sends nothing would stop
                            // this listener from accepting anyone else, for good.
                            let acceptor = acceptor.clone();
                            let session_manager = self.session_manager.clone();
                            let limit = self.tls_timeout;
                            tokio::spawn(async move {
                                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                    Ok(Ok(enc_stream)) => {
                                        let stream = super::NetworkStream::TlsServer {
                                            peer_addr: addr,
                                            local_addr: local,
                                            stream: enc_stream,
                                        };
                                        let _ = cast!(
                                            session_manager,
                                            NodeServerMessage::ConnectionOpened {
                                                stream: Box::new(stream),
                                                is_server: true
                                            }
                                        );
                                        tracing::info!("TLS Session opened for {addr}");
                                    }
                                    Ok(Err(some_err)) => {
                                        tracing::warn!(
                                            "Error establishing secure socket with {addr}: {}",
                                            describe_tls_failure(&some_err)
                                        );
                                    }
                                    Err(_) => {
                                        tracing::warn!(
                                            "No TLS handshake from {addr} within {limit:?}; closed"
                                        );
                                    }
                                }
                            });
                        }
                    }
                }
                Err(socket_accept_error) => {
                    tracing::warn!("Error accepting socket {socket_accept_error} on Node server");
                }
            }
        }

        // continue accepting new sockets
        let _ = myself.cast(ListenerMessage);
        Ok(())
    }
}

/// A TLS accept failure, with what it most likely means for the operator.
fn describe_tls_failure(err: &std::io::Error) -> String {
    use tokio_rustls::rustls::Error;
    let cause = match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidMessage(_)) => "the peer does not speak TLS (is TLS on for both nodes?)",
        Some(Error::NoCertificatesPresented) => "the peer presented no client certificate",
        Some(Error::InvalidCertificate(_)) => "the peer's certificate was refused",
        Some(Error::AlertReceived(_)) => "the peer refused the handshake (most likely our certificate)",
        _ => return err.to_string(),
    };
    format!("{cause}: {err}")
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use tokio::net::TcpListener;

    #[test]
    fn test_listener_ipv4_binding() {
        // Test that custom IPv4 address binding works
        // We can't fully test the actor without mocking, but we can test the
        // socket binding logic that the listener uses
        let ipv4_addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let _socket_addr = std::net::SocketAddr::new(ipv4_addr, 0);
        // This will be tested in integration tests since it requires an ActorRef
    }

    #[tokio::test]
    async fn test_listener_default_dual_stack() {
        // Test that default listener binds to dual-stack IPv6 ([::]：0)
        // This tests the socket2 configuration path
        use socket2::{Domain, Protocol, Socket, Type};

        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))
            .expect("Socket creation failed");
        socket.set_only_v6(false).expect("set_only_v6 failed");
        socket
            .set_reuse_address(true)
            .expect("set_reuse_address failed");
        socket
            .set_nonblocking(true)
            .expect("set_nonblocking failed");

        let addr = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0);
        socket.bind(&addr.into()).expect("bind failed");
        socket.listen(128).expect("listen failed");

        let tcp_listener =
            TcpListener::from_std(std::net::TcpListener::from(socket)).expect("from_std failed");

        // Verify the listener is bound
        let local_addr = tcp_listener.local_addr().expect("local_addr failed");
        assert!(local_addr.port() > 0, "Port should be assigned");
    }

    #[tokio::test]
    async fn test_listener_custom_ipv4_address() {
        // Test that custom IPv4 address binding works
        let ipv4_addr = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let socket_addr = std::net::SocketAddr::new(ipv4_addr, 0);

        let listener = TcpListener::bind(socket_addr)
            .await
            .expect("Failed to bind IPv4 listener");

        let local = listener.local_addr().expect("local_addr failed");
        assert_eq!(
            local.ip(),
            ipv4_addr,
            "Should bind to specified IPv4 address"
        );
    }
}
