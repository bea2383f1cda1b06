// Copyright (c) Sean Lawlor
//
// This source code is licensed under both the MIT license found in the
// LICENSE-MIT file in the root directory of this source tree.

//! Define's a node's authentication process between peers. The message flow follows
//! [Erlang's handshake](https://www.erlang.org/doc/apps/erts/erl_dist_protocol.html), but the
//! digests are mutual and bound to the session (auth v2):
//!
//! - each side sends a 32-byte random nonce (the server in its `Challenge`, the client in its
//!   `ChallengeReply`);
//! - the client proves it holds the cookie with an HMAC over the transcript (both names, both
//!   nonces, the `client` role), and the server answers with its own proof (the `server` role);
//!   see [crate::hash];
//! - a peer that presents this node's own name is refused on either side.
//!
//! Erlang's digests (and auth v1) are `hash(challenge ‖ cookie)`: a node that dials out answers
//! whatever challenge it is given. An attacker could open a session to a node, make that node
//! dial the attacker, hand it the node's own challenge, and relay the answer back: a session
//! authenticated without the cookie. With v2 the answer names its prover and verifier and
//! holds both nonces, so it is worthless in any other session or direction.

use crate::hash::{Digest, Nonce, Role, Transcript};
use crate::protocol::auth as proto;
use rand::Rng;

/// What one side of a handshake knows of itself.
#[derive(Clone, Copy)]
pub(crate) struct Credentials<'a> {
    /// The cluster cookie.
    pub(crate) cookie: &'a str,
    /// This node's name.
    pub(crate) name: &'a str,
}

/// Why a handshake was refused (other than an empty or out-of-order message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer's proof does not match this node's cookie.
    WrongCookie,
    /// The peer presented this node's own name.
    OwnName,
    /// The peer does not send the v2 nonces.
    LegacyPeer,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::WrongCookie => "wrong_cookie",
            Refusal::OwnName => "own_name",
            Refusal::LegacyPeer => "legacy_handshake",
        })
    }
}

/// A nonce received from the peer, if it has the right length.
fn peer_nonce(bytes: &[u8]) -> Option<Nonce> {
    bytes.try_into().ok()
}

/// Server authentication FSM
#[derive(Debug)]
pub(crate) enum ServerAuthenticationProcess {
    /// (1) Client initiates handshake by sending their peer name
    WaitingOnPeerName,

    /// (2) We have the peer name, and have replied with our own [proto::ServerStatus]
    /// reply
    HavePeerName(proto::NameMessage),

    /// (2B) Waiting on the client's status (true/false), if [proto::ClientStatus] was `alive`.
    /// Argument is the client's name.
    WaitingOnClientStatus(String),

    /// (3) Waiting on the client's reply to the [proto::Challenge] from the server.
    ///
    /// Arguments are the legacy challenge value to send to the client, our nonce, and the
    /// client's name
    WaitingOnClientChallengeReply(u32, Nonce, String),

    /// (4) We verified the client's proof, and replied and we're ok with the channel.
    /// The client has the final decision after they check our proof which we send
    /// with [proto::ChallengeAck]
    ///
    /// Arguments are the proof to send to the client and the session key
    Ok(Digest, Digest),

    /// Close
    Close,

    /// Close, for this reason
    Refused(Refusal),
}

impl ServerAuthenticationProcess {
    /// Initialize the FSM state
    pub(crate) fn init() -> Self {
        Self::WaitingOnPeerName
    }

    pub(crate) fn start_challenge(&self) -> Self {
        let peer = match self {
            Self::WaitingOnClientStatus(peer) => peer.clone(),
            Self::HavePeerName(name) => name.name.clone(),
            _ => return Self::Close,
        };
        Self::WaitingOnClientChallengeReply(rand::rng().next_u32(), crate::hash::nonce(), peer)
    }

    /// Implement the FSM state transitions
    pub(crate) fn next(
        &self,
        auth_message: proto::AuthenticationMessage,
        me: Credentials<'_>,
    ) -> Self {
        if let Some(msg) = auth_message.msg {
            match msg {
                proto::authentication_message::Msg::Name(name) => {
                    if let Self::WaitingOnPeerName = &self {
                        if name.name == me.name {
                            tracing::warn!(
                                "refused a connection from a peer that claims this node's own name"
                            );
                            return Self::Refused(Refusal::OwnName);
                        }
                        return Self::HavePeerName(name);
                    }
                }
                proto::authentication_message::Msg::ClientStatus(status) => {
                    if let Self::WaitingOnClientStatus(_) = &self {
                        // client says to not continue the session
                        if !status.status {
                            return Self::Close;
                        } else {
                            return self.start_challenge();
                        }
                    }
                }
                proto::authentication_message::Msg::ClientChallenge(challenge_reply) => {
                    if let Self::WaitingOnClientChallengeReply(_, server_nonce, peer) = &self {
                        let Some(client_nonce) = peer_nonce(&challenge_reply.nonce) else {
                            tracing::warn!(
                                "refused a connection: the peer does not speak the v2 (bound) handshake"
                            );
                            return Self::Refused(Refusal::LegacyPeer);
                        };
                        let transcript = Transcript {
                            client_name: peer,
                            server_name: me.name,
                            server_nonce,
                            client_nonce: &client_nonce,
                        };
                        if transcript.verify(me.cookie, Role::Client, &challenge_reply.digest) {
                            return Self::Ok(
                                transcript.proof(me.cookie, Role::Server),
                                transcript.session_key(me.cookie),
                            );
                        } else {
                            tracing::warn!(
                                "refused a connection: the peer's proof does not match this node's cookie"
                            );
                            return Self::Refused(Refusal::WrongCookie);
                        }
                    }
                }
                _ => {}
            }
        }
        // received either an empty message or an out-of-order message. The node can't be trusted
        Self::Close
    }
}

/// Client authentication FSM
#[derive(Debug)]
pub(crate) enum ClientAuthenticationProcess {
    /// (1) After the client has sent their peer name
    /// they wait for the [proto::ServerStatus] from the server
    WaitingForServerStatus,

    /// (2) We've potentially sent our client status. Either way
    /// we're waiting for the [proto::Challenge] from the server
    WaitingForServerChallenge(proto::ServerStatus),

    /// (3) We've sent our proof and nonce to the server, and we're waiting
    /// on the server's proof to determine if we should open the channel.
    ///
    /// Arguments are the server's challenge, our proof, our legacy challenge value, our nonce,
    /// and the transcript's session key
    WaitingForServerChallengeAck(proto::Challenge, Digest, u32, Nonce, Digest),

    /// (4) We've validated the server's proof and agree that the channel is now open for
    /// node inter-communication. Argument is the session key
    Ok(Digest),

    /// Close
    Close,

    /// Close, for this reason
    Refused(Refusal),
}

impl ClientAuthenticationProcess {
    /// Initialize the FSM state
    pub(crate) fn init() -> Self {
        Self::WaitingForServerStatus
    }

    /// Implement the client FSM transitions
    pub(crate) fn next(
        &self,
        auth_message: proto::AuthenticationMessage,
        me: Credentials<'_>,
    ) -> Self {
        if let Some(msg) = auth_message.msg {
            match msg {
                proto::authentication_message::Msg::ServerStatus(status) => {
                    if let Self::WaitingForServerStatus = &self {
                        return Self::WaitingForServerChallenge(status);
                    }
                }
                proto::authentication_message::Msg::ServerChallenge(challenge_msg) => {
                    if let Self::WaitingForServerChallenge(_) = &self {
                        if challenge_msg.name == me.name {
                            tracing::warn!(
                                "refused a session: the node dialed presents this node's own name"
                            );
                            return Self::Refused(Refusal::OwnName);
                        }
                        let Some(server_nonce) = peer_nonce(&challenge_msg.nonce) else {
                            tracing::warn!(
                                "refused a session: the node dialed does not speak the v2 (bound) handshake"
                            );
                            return Self::Refused(Refusal::LegacyPeer);
                        };
                        let client_nonce = crate::hash::nonce();
                        let transcript = Transcript {
                            client_name: me.name,
                            server_name: &challenge_msg.name,
                            server_nonce: &server_nonce,
                            client_nonce: &client_nonce,
                        };
                        let proof = transcript.proof(me.cookie, Role::Client);
                        let key = transcript.session_key(me.cookie);
                        return Self::WaitingForServerChallengeAck(
                            challenge_msg,
                            proof,
                            rand::rng().next_u32(),
                            client_nonce,
                            key,
                        );
                    }
                }
                proto::authentication_message::Msg::ServerAck(challenge_ack) => {
                    if let Self::WaitingForServerChallengeAck(challenge, _, _, client_nonce, key) =
                        &self
                    {
                        let Some(server_nonce) = peer_nonce(&challenge.nonce) else {
                            return Self::Close;
                        };
                        let transcript = Transcript {
                            client_name: me.name,
                            server_name: &challenge.name,
                            server_nonce: &server_nonce,
                            client_nonce,
                        };
                        if transcript.verify(me.cookie, Role::Server, &challenge_ack.digest) {
                            return Self::Ok(*key);
                        } else {
                            tracing::warn!(
                                "refused a session: the server's proof does not match this node's cookie"
                            );
                            return Self::Refused(Refusal::WrongCookie);
                        }
                    }
                }
                _ => {}
            }
        }
        // received either an empty message or an out-of-order message. The node can't be trusted
        Self::Close
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::auth::NodeFlags;

    fn msg(m: proto::authentication_message::Msg) -> proto::AuthenticationMessage {
        proto::AuthenticationMessage { msg: Some(m) }
    }

    fn name(n: &str) -> proto::authentication_message::Msg {
        proto::authentication_message::Msg::Name(proto::NameMessage {
            name: n.to_string(),
            flags: Some(NodeFlags { version: 1 }),
            connection_string: "localhost:123".to_string(),
            connection_id: 7,
        })
    }

    fn status_ok() -> proto::authentication_message::Msg {
        proto::authentication_message::Msg::ServerStatus(proto::ServerStatus {
            status: proto::server_status::Status::Ok as i32,
        })
    }

    /// The server's challenge message for a server FSM waiting on the client's reply.
    fn challenge_of(server: &ServerAuthenticationProcess, server_name: &str) -> proto::Challenge {
        let ServerAuthenticationProcess::WaitingOnClientChallengeReply(challenge, nonce, _) = server
        else {
            panic!("server is not challenging: {server:?}");
        };
        proto::Challenge {
            name: server_name.to_string(),
            flags: Some(NodeFlags { version: 1 }),
            challenge: *challenge,
            connection_string: "localhost:123".to_string(),
            nonce: nonce.to_vec(),
        }
    }

    /// The client's reply for a client FSM that took the server's challenge.
    fn reply_of(client: &ClientAuthenticationProcess) -> proto::ChallengeReply {
        let ClientAuthenticationProcess::WaitingForServerChallengeAck(_, proof, challenge, nonce, _) =
            client
        else {
            panic!("client has not answered: {client:?}");
        };
        proto::ChallengeReply {
            challenge: *challenge,
            digest: proof.to_vec(),
            nonce: nonce.to_vec(),
        }
    }

    /// A server FSM for `server_name` that has the client's name and challenged it.
    fn challenging_server(server: Credentials<'_>, client_name: &str) -> ServerAuthenticationProcess {
        let s = ServerAuthenticationProcess::init().next(msg(name(client_name)), server);
        assert!(matches!(s, ServerAuthenticationProcess::HavePeerName(_)));
        s.start_challenge()
    }

    fn answering_client(
        client: Credentials<'_>,
        challenge: proto::Challenge,
    ) -> ClientAuthenticationProcess {
        ClientAuthenticationProcess::init()
            .next(msg(status_ok()), client)
            .next(
                msg(proto::authentication_message::Msg::ServerChallenge(challenge)),
                client,
            )
    }

    const A: Credentials<'static> = Credentials {
        cookie: "cookie",
        name: "a@host",
    };
    const B: Credentials<'static> = Credentials {
        cookie: "cookie",
        name: "b@host",
    };

    #[test]
    fn a_full_handshake_authenticates_both_sides_with_one_session_key() {
        let server = challenging_server(B, A.name);
        let client = answering_client(A, challenge_of(&server, B.name));
        let server = server.next(
            msg(proto::authentication_message::Msg::ClientChallenge(
                reply_of(&client),
            )),
            B,
        );
        let ServerAuthenticationProcess::Ok(ack, server_key) = &server else {
            panic!("server refused: {server:?}");
        };
        let client = client.next(
            msg(proto::authentication_message::Msg::ServerAck(
                proto::ChallengeAck {
                    digest: ack.to_vec(),
                },
            )),
            A,
        );
        let ClientAuthenticationProcess::Ok(client_key) = client else {
            panic!("client refused: {client:?}");
        };
        assert_eq!(*server_key, client_key);
    }

    #[test]
    fn a_client_without_the_cookie_is_refused() {
        let server = challenging_server(B, A.name);
        let stranger = Credentials {
            cookie: "another",
            ..A
        };
        let client = answering_client(stranger, challenge_of(&server, B.name));
        let server = server.next(
            msg(proto::authentication_message::Msg::ClientChallenge(
                reply_of(&client),
            )),
            B,
        );
        assert!(matches!(
            server,
            ServerAuthenticationProcess::Refused(Refusal::WrongCookie)
        ));
    }

    #[test]
    fn a_server_without_the_cookie_is_refused_by_the_client() {
        let stranger = Credentials {
            cookie: "another",
            ..B
        };
        let server = challenging_server(stranger, A.name);
        let client = answering_client(A, challenge_of(&server, B.name));
        // The stranger cannot verify the client; it answers something of its own.
        let forged = crate::hash::Transcript {
            client_name: A.name,
            server_name: B.name,
            server_nonce: &[0; 32],
            client_nonce: &[0; 32],
        }
        .proof("another", crate::hash::Role::Server);
        let client = client.next(
            msg(proto::authentication_message::Msg::ServerAck(
                proto::ChallengeAck {
                    digest: forged.to_vec(),
                },
            )),
            A,
        );
        assert!(matches!(
            client,
            ClientAuthenticationProcess::Refused(Refusal::WrongCookie)
        ));
    }

    #[test]
    fn the_reflection_attack_is_refused() {
        // The attacker X opens a session to A (A serves) and, claiming to be A, makes A dial
        // it (A is the client), hands A its own challenge and relays A's answer back.
        let claimed = A.name;
        let s = ServerAuthenticationProcess::init().next(msg(name(claimed)), A);
        assert!(
            matches!(s, ServerAuthenticationProcess::Refused(Refusal::OwnName)),
            "a peer claiming the server's own name is refused at once"
        );

        // Claiming another name does not help: A's answer as a client names A as prover.
        let a_serving = challenging_server(A, "x@host");
        let mut reflected = challenge_of(&a_serving, A.name);
        let a_dialing = answering_client(A, reflected.clone());
        assert!(
            matches!(a_dialing, ClientAuthenticationProcess::Refused(Refusal::OwnName)),
            "a server presenting the client's own name is refused"
        );
        reflected.name = "x@host".to_string();
        let a_dialing = answering_client(A, reflected);
        let relayed = reply_of(&a_dialing);
        let a_serving = a_serving.next(
            msg(proto::authentication_message::Msg::ClientChallenge(relayed)),
            A,
        );
        assert!(matches!(
            a_serving,
            ServerAuthenticationProcess::Refused(Refusal::WrongCookie)
        ));
    }

    #[test]
    fn a_peer_without_nonces_is_refused() {
        let server = challenging_server(B, A.name);
        let client = answering_client(A, challenge_of(&server, B.name));
        let mut v1 = reply_of(&client);
        v1.nonce.clear();
        let server = server.next(
            msg(proto::authentication_message::Msg::ClientChallenge(v1)),
            B,
        );
        assert!(matches!(
            server,
            ServerAuthenticationProcess::Refused(Refusal::LegacyPeer)
        ));

        let server = challenging_server(B, A.name);
        let mut v1 = challenge_of(&server, B.name);
        v1.nonce.truncate(4);
        assert!(matches!(
            answering_client(A, v1),
            ClientAuthenticationProcess::Refused(Refusal::LegacyPeer)
        ));
    }

    #[test]
    fn out_of_order_messages_close_the_handshake() {
        let status = msg(proto::authentication_message::Msg::ClientStatus(
            proto::ClientStatus { status: true },
        ));
        assert!(matches!(
            ServerAuthenticationProcess::init().next(status.clone(), B),
            ServerAuthenticationProcess::Close
        ));
        let server = challenging_server(B, A.name);
        assert!(matches!(
            server.next(status, B),
            ServerAuthenticationProcess::Close
        ));
        assert!(matches!(
            ClientAuthenticationProcess::init().next(msg(name("b@host")), A),
            ClientAuthenticationProcess::Close
        ));
        let waiting = ServerAuthenticationProcess::WaitingOnClientStatus(A.name.to_string());
        assert!(matches!(
            waiting.next(
                msg(proto::authentication_message::Msg::ClientStatus(
                    proto::ClientStatus { status: true }
                )),
                B
            ),
            ServerAuthenticationProcess::WaitingOnClientChallengeReply(_, _, _)
        ));
    }
}
