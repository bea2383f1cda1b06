//! The HTTP API against a hostile web page and slow clients, on a real `canopy` node: the
//! API key (401 without it or with a wrong one, `/health` open), the `Host` check (403 for
//! a DNS-rebinding name), JSON endpoints refusing `text/plain` (415), the header timeout
//! closing idle connections, connections past the cap answered 503, a 16 MiB body's 413
//! read by Python's `http.client` (which writes its whole body before reading), and a
//! node that will not serve a non-loopback address without a key.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, NodeProcess};

const KEY: &str = "test-key-0123456789abcdef";

fn node(extra: &[&str]) -> NodeProcess {
    let mut args = vec!["node", "--engine", "scripted"];
    args.extend_from_slice(extra);
    NodeProcess::start(&args, &[("CANOPY_API_KEY", KEY)], false)
}

fn addr(node: &NodeProcess) -> String {
    node.base.trim_start_matches("http://").to_string()
}

/// Sends `request` raw and reads the answer until the server closes or 5 s pass.
fn raw(node: &NodeProcess, request: &str) -> String {
    let mut stream = TcpStream::connect(addr(node)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn request(method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    text
}

#[test]
fn the_key_the_host_and_the_content_type_are_checked() {
    let node = node(&[]);
    let host = format!("Host: {}", addr(&node));
    let bearer = format!("Authorization: Bearer {KEY}");
    let chat = r#"{"model":"scripted","messages":[{"role":"user","content":"hi"}]}"#;

    // /health is open; everything else needs the key, unknown routes included.
    let health = raw(&node, &request("GET", "/health", &[&host], ""));
    assert_eq!(status_of(&health), 200, "{health}");
    for path in ["/state", "/v1/models", "/metrics", "/no-such-route"] {
        let answer = raw(&node, &request("GET", path, &[&host], ""));
        assert_eq!(status_of(&answer), 401, "{path}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{answer}"
        );
        assert!(answer.contains("invalid_api_key"), "{answer}");
    }
    let wrong = raw(
        &node,
        &request(
            "GET",
            "/state",
            &[&host, "Authorization: Bearer wrong-key-0123456789"],
            "",
        ),
    );
    assert_eq!(status_of(&wrong), 401, "{wrong}");
    assert!(wrong.contains("Incorrect API key"), "{wrong}");
    let ok = raw(&node, &request("GET", "/state", &[&host, &bearer], ""));
    assert_eq!(status_of(&ok), 200, "{ok}");

    // A DNS-rebinding page: the right key would not even be sent by a browser, and the
    // name alone is refused.
    for foreign in ["Host: evil.example", "Host: evil.example:52415"] {
        let answer = raw(&node, &request("GET", "/state", &[foreign, &bearer], ""));
        assert_eq!(status_of(&answer), 403, "{answer}");
        assert!(answer.contains("forbidden_host"), "{answer}");
    }
    let localhost = raw(
        &node,
        &request("GET", "/state", &["Host: localhost", &bearer], ""),
    );
    assert_eq!(status_of(&localhost), 200, "{localhost}");

    // A form or text/plain POST (what a page can send without a preflight) is refused, and
    // nothing runs; the same body as JSON is served.
    for content_type in [
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
    ] {
        let answer = raw(
            &node,
            &request(
                "POST",
                "/v1/chat/completions",
                &[&host, &bearer, content_type],
                chat,
            ),
        );
        assert_eq!(status_of(&answer), 415, "{answer}");
        assert!(answer.contains("unsupported_media_type"), "{answer}");
    }
    let placed = raw(
        &node,
        &request(
            "POST",
            "/instances",
            &[&host, &bearer, "Content-Type: text/plain"],
            r#"{"model":"scripted"}"#,
        ),
    );
    assert_eq!(status_of(&placed), 415, "{placed}");
    node.interrupt_and_check();
}

#[test]
fn idle_connections_time_out_and_the_cap_is_answered() {
    let node = node(&["--header-timeout", "1", "--max-connections", "3"]);
    // An idle connection is closed by the header timeout.
    let mut idle = TcpStream::connect(addr(&node)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the idle connection was held {:?}",
        started.elapsed()
    );

    // Three slow clients fill the cap; the fourth is answered 503 at once, not hung.
    let holders: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut s = TcpStream::connect(addr(&node)).expect("connect");
            s.write_all(b"GET /health HTTP/1.1\r\n")
                .expect("partial headers");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let over = raw(&node, &request("GET", "/health", &["Host: 127.0.0.1"], ""));
    assert_eq!(status_of(&over), 503, "{over}");
    assert!(over.contains("too_many_connections"), "{over}");
    assert!(over.to_ascii_lowercase().contains("retry-after"), "{over}");
    // Once the slow ones time out, the node serves again.
    drop(holders);
    common::eventually(Duration::from_secs(5), "the node to serve again", || {
        status_of(&raw(
            &node,
            &request("GET", "/health", &["Host: 127.0.0.1"], ""),
        )) == 200
    })
    .expect("serving again");
    node.interrupt_and_check();
}

#[test]
fn python_http_client_reads_the_413_of_a_16_mib_body() {
    let node = node(&[]);
    let script = format!(
        r#"
import http.client, json
c = http.client.HTTPConnection("{addr}", timeout=60)
body = b'{{"model": "' + b"x" * (16 * 1024 * 1024) + b'"}}'
c.request("POST", "/v1/chat/completions", body=body,
          headers={{"Content-Type": "application/json", "Authorization": "Bearer {KEY}"}})
r = c.getresponse()
print(r.status, json.loads(r.read())["error"]["code"])
"#,
        addr = addr(&node)
    );
    let output = match Command::new("python3").arg("-c").arg(&script).output() {
        Ok(output) => output,
        Err(err) => {
            eprintln!("SKIPPED: no python3 ({err})");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python failed: {}{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "413 request_too_large");
    node.interrupt_and_check();
}

#[test]
fn a_non_loopback_address_without_a_key_is_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .args([
            "node",
            "--standalone",
            "--engine",
            "scripted",
            "--host",
            "0.0.0.0",
        ])
        .env_remove("CANOPY_API_KEY")
        .env_remove("CANOPY_INSECURE_NO_API_KEY")
        .output()
        .expect("canopy runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without an API key"), "{stderr}");
    assert!(stderr.contains("--insecure-no-api-key"), "{stderr}");
}

#[test]
fn the_dashboard_asks_for_the_key_and_its_session_cookie_opens_the_api() {
    let node = node(&[]);
    let host = addr(&node);
    let get = |path: &str, cookie: &str| {
        raw(
            &node,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Connection: close\r\n\r\n"),
        )
    };
    let login = get("/", "");
    assert_eq!(status_of(&login), 200, "{login}");
    assert!(login.contains("API key"), "{login}");
    assert!(!login.contains("instances"), "the login page shows no data");
    assert_eq!(status_of(&get("/v1/events?follow=false", "")), 401);
    assert_eq!(status_of(&get("/dashboard/assets/app.js", "")), 200);
    let post = |key: &str| {
        let body = format!("key={key}");
        raw(
            &node,
            &format!(
                "POST /dashboard/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let wrong = post("not-the-key-0123456789");
    assert_eq!(status_of(&wrong), 401, "{wrong}");
    assert!(
        !wrong.to_ascii_lowercase().contains("set-cookie"),
        "{wrong}"
    );
    let right = post(KEY);
    assert_eq!(status_of(&right), 303, "{right}");
    let cookie = right
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .expect("a session cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().expect("name=value").to_string();
    assert!(
        !session.contains(KEY),
        "the cookie does not hold the key itself"
    );
    let events = get("/v1/events?follow=false", &format!("Cookie: {session}\r\n"));
    assert_eq!(status_of(&events), 200, "{events}");
    assert!(events.contains("\"events\""), "{events}");
    let page = get("/", &format!("Cookie: {session}\r\n"));
    assert!(page.contains("/dashboard/assets/app.js"), "{page}");
    let forged = get(
        "/v1/events?follow=false",
        "Cookie: canopy_session=0000000000000000000000000000000000000000000000000000000000000000\r\n",
    );
    assert_eq!(status_of(&forged), 401);
}
