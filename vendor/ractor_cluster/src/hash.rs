// Copyright (c) Sean Lawlor
//
// This source code is licensed under both the MIT license found in the
// LICENSE-MIT file in the root directory of this source tree.

//! Hashing utilities used by the handshake: the transcript-bound proofs each side gives that
//! it holds the cookie, and the key both sides derive for the session.
//!
//! Every value is an HMAC-SHA256 keyed by the cookie over a domain label and the handshake
//! transcript: the prover's name, the verifier's name, the server's nonce and the client's
//! nonce, each length-prefixed. The label says which side proves (`client` or `server`), so a
//! proof made in one role can never be replayed in the other, and the two names bind it to
//! this pair of nodes in this direction, so it cannot be relayed into another session.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub(crate) const DIGEST_BYTES: usize = 32;
pub(crate) type Digest = [u8; DIGEST_BYTES];

/// Bytes of each side's handshake nonce.
pub(crate) const NONCE_BYTES: usize = 32;
/// A handshake nonce.
pub(crate) type Nonce = [u8; NONCE_BYTES];

/// Which side of the handshake a proof is made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The side that dialed.
    Client,
    /// The side that accepted.
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"ractor-cluster/auth-v2/client-proof",
            Role::Server => b"ractor-cluster/auth-v2/server-proof",
        }
    }
}

/// The handshake transcript both sides agree on once the nonces are exchanged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transcript<'a> {
    /// The dialing node's name.
    pub(crate) client_name: &'a str,
    /// The accepting node's name.
    pub(crate) server_name: &'a str,
    /// The accepting node's nonce.
    pub(crate) server_nonce: &'a Nonce,
    /// The dialing node's nonce.
    pub(crate) client_nonce: &'a Nonce,
}

fn mac(secret: &str, label: &[u8], fields: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(&(label.len() as u32).to_be_bytes());
    mac.update(label);
    for field in fields {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac
}

impl Transcript<'_> {
    fn fields(&self, role: Role) -> [&[u8]; 4] {
        let (prover, verifier) = match role {
            Role::Client => (self.client_name, self.server_name),
            Role::Server => (self.server_name, self.client_name),
        };
        [
            prover.as_bytes(),
            verifier.as_bytes(),
            self.server_nonce,
            self.client_nonce,
        ]
    }

    /// The proof that `role` holds the cookie `secret`.
    pub(crate) fn proof(&self, secret: &str, role: Role) -> Digest {
        mac(secret, role.label(), &self.fields(role))
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `claimed` is `role`'s proof, compared in constant time.
    pub(crate) fn verify(&self, secret: &str, role: Role, claimed: &[u8]) -> bool {
        mac(secret, role.label(), &self.fields(role))
            .verify_slice(claimed)
            .is_ok()
    }

    /// The secret both sides of an authenticated session share: nobody without the cookie and
    /// both nonces can compute it.
    pub(crate) fn session_key(&self, secret: &str) -> Digest {
        mac(
            secret,
            b"ractor-cluster/auth-v2/session-key",
            &self.fields(Role::Client),
        )
        .finalize()
        .into_bytes()
        .into()
    }
}

/// A fresh random nonce.
pub(crate) fn nonce() -> Nonce {
    use rand::Rng;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(client: &'a str, server: &'a str, sn: &'a Nonce, cn: &'a Nonce) -> Transcript<'a> {
        Transcript {
            client_name: client,
            server_name: server,
            server_nonce: sn,
            client_nonce: cn,
        }
    }

    #[test]
    fn proofs_are_bound_to_role_names_nonces_and_cookie() {
        let (sn, cn) = ([1u8; 32], [2u8; 32]);
        let t = transcript("a@h", "b@h", &sn, &cn);
        let client = t.proof("cookie", Role::Client);
        assert!(t.verify("cookie", Role::Client, &client));
        assert!(!t.verify("cookie", Role::Server, &client), "roles differ");
        assert!(!t.verify("other", Role::Client, &client), "cookies differ");
        let swapped = transcript("b@h", "a@h", &sn, &cn);
        assert!(!swapped.verify("cookie", Role::Client, &client), "names differ");
        let other_nonce = [3u8; 32];
        let renonced = transcript("a@h", "b@h", &sn, &other_nonce);
        assert!(!renonced.verify("cookie", Role::Client, &client), "nonces differ");
        assert_ne!(t.session_key("cookie"), client);
        assert_ne!(t.session_key("cookie"), t.session_key("other"));
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let (sn, cn) = ([1u8; 32], [2u8; 32]);
        let a = transcript("ab", "c", &sn, &cn).proof("k", Role::Client);
        let b = transcript("a", "bc", &sn, &cn).proof("k", Role::Client);
        assert_ne!(a, b);
    }
}
