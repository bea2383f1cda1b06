//! Anthropic's Messages API (`POST /v1/messages`) against the scripted fake of `api.rs`:
//! the message shape, the system prompt and parameters reaching the backend, the stream's
//! named events and their framing, refusals by name, Anthropic's error shape and statuses,
//! the retry before output, the error event after output, cancellation on disconnect, and
//! the API key sent as `x-api-key`.

use super::*;

/// A request with extra headers (`x-api-key`, `anthropic-version`); the body, if any, is
/// sent as JSON.
async fn send_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<String>,
    headers: &[(&str, &str)],
) -> Reply {
    let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(STEP, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub(crate) async fn messages(addr: SocketAddr, body: Value) -> Reply {
    send_with(
        addr,
        "POST",
        "/v1/messages",
        Some(body.to_string()),
        &[("anthropic-version", "2023-06-01")],
    )
    .await
}

fn body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 16,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": stream,
    })
}

/// The events of an SSE body as (name, data as JSON), checking that each is exactly one
/// `event:` line and one `data:` line.
pub(crate) fn events(body: &str) -> Vec<(String, Value)> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let lines: Vec<&str> = block.lines().collect();
            assert_eq!(
                lines.len(),
                2,
                "one event line and one data line: {block:?}"
            );
            let name = lines[0]
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no event name: {block:?}"));
            let data = lines[1]
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no data: {block:?}"));
            let data: Value =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("bad data {data}: {e}"));
            (name.to_string(), data)
        })
        .collect()
}

/// Checks Anthropic's error shape and returns (type, message).
fn anthropic_error(reply: &Reply) -> (String, String) {
    let body = reply.json();
    assert_eq!(body["type"], "error", "{}", reply.body);
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 2, "only `type` and `error`: {}", reply.body);
    let error = body["error"].as_object().expect("an error object");
    assert_eq!(error.len(), 2, "only `type` and `message`: {}", reply.body);
    (
        error["type"].as_str().expect("type").to_string(),
        error["message"].as_str().expect("message").to_string(),
    )
}

#[tokio::test]
async fn a_message_is_answered_in_anthropic_shape_and_the_system_prompt_reaches_the_backend() {
    let api = start().await;
    let mut request = body("scripted", false);
    request["temperature"] = json!(0.3);
    request["top_k"] = json!(5);
    request["stop_sequences"] = json!(["\n\nHuman:"]);
    request["metadata"] = json!({"user_id": "u-1"});
    let reply = messages(api.addr, request).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let message = reply.json();
    assert!(
        message["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_")),
        "{message}"
    );
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "scripted");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello, world"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["stop_sequence"], Value::Null);
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 7, "output_tokens": 3})
    );

    let submits = api.fake.submits();
    assert_eq!(submits.len(), 1);
    let (model, wait, request) = &submits[0];
    assert_eq!((model.as_str(), *wait), ("scripted", None));
    let Prompt::Chat(turns) = &request.prompt else {
        panic!("a chat prompt");
    };
    let turns: Vec<(&str, &str)> = turns
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(turns, vec![("system", "Be brief."), ("user", "Hi")]);
    let p = &request.params;
    assert_eq!((p.max_tokens, p.temperature, p.top_k), (16, 0.3, Some(5)));
    assert_eq!(p.stop, vec!["\n\nHuman:".to_string()]);
    api.stop().await;
}

#[tokio::test]
async fn a_stream_sends_anthropics_named_events_in_order() {
    let api = start().await;
    let reply = messages(api.addr, body("scripted", true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/event-stream")),
        "{:?}",
        reply.headers
    );
    let events = events(&reply.body);
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "each event's data is of its type"
        );
    }
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ],
        "{}",
        reply.body
    );
    let start = &events[0].1["message"];
    assert!(
        start["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["model"], "scripted");
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}})
    );
    let text: String = events[3..6]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["index"], 0);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().expect("text").to_string()
        })
        .collect();
    assert_eq!(text, "Hello, world");
    assert_eq!(
        events[6].1,
        json!({"type": "content_block_stop", "index": 0})
    );
    assert_eq!(
        events[7].1,
        json!({"type": "message_delta",
               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"input_tokens": 7, "output_tokens": 3}})
    );
    assert_eq!(events[8].1, json!({"type": "message_stop"}));

    // A silent task: `ping` events keep the connection alive meanwhile.
    let reply = messages(api.addr, body("slow", true)).await;
    assert_eq!(reply.status, 200);
    let events = super::anthropic::events(&reply.body);
    let pings = events.iter().filter(|(n, _)| n == "ping").count();
    assert!(pings >= 2, "pings flow while waiting: {}", reply.body);
    assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("message_stop"));
    api.stop().await;
}

#[tokio::test]
async fn refused_fields_are_400s_naming_them() {
    let api = start().await;
    let user = json!([{"role": "user", "content": "x"}]);
    for (extra, field) in [
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "tools[0].type",
        ),
        (json!({"tool_choice": {"type": "any"}}), "tool_choice"),
        (
            json!({"thinking": {"type": "enabled", "budget_tokens": 2048}}),
            "thinking",
        ),
        (json!({"mystery": true}), "mystery"),
        (json!({"temperature": 1.5}), "temperature"),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
            ]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}
            ]}]}),
            "messages[0].content[0]",
        ),
        (
            json!({"messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}
            ]}]}),
            "messages[0].content[0]",
        ),
    ] {
        let mut request = json!({"model": "scripted", "max_tokens": 8, "messages": user});
        for (k, v) in extra.as_object().expect("object") {
            request[k] = v.clone();
        }
        let reply = messages(api.addr, request).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.body);
        let (kind, message) = anthropic_error(&reply);
        assert_eq!(kind, "invalid_request_error");
        assert!(message.contains(field), "{field}: {message}");
    }
    let reply = messages(
        api.addr,
        json!({"model": "scripted", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        anthropic_error(&reply).1.contains("max_tokens"),
        "{}",
        reply.body
    );
    assert!(
        api.fake.submits().is_empty(),
        "nothing refused reached the backend"
    );
    api.stop().await;
}

#[tokio::test]
async fn errors_are_anthropic_shaped_with_the_usual_statuses() {
    let api = start().await;
    let reply = messages(api.addr, body("nope", false)).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let (kind, message) = anthropic_error(&reply);
    assert_eq!(kind, "not_found_error");
    assert!(message.starts_with("model: nope"), "{message}");
    let reply = messages(api.addr, body("busy", false)).await;
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(anthropic_error(&reply).0, "rate_limit_error");
    let reply = messages(api.addr, body("cold", true)).await;
    assert_eq!(reply.status, 503);
    assert_eq!(anthropic_error(&reply).0, "overloaded_error");
    let reply = messages(api.addr, body("task-error", false)).await;
    assert_eq!(reply.status, 500);
    assert_eq!(anthropic_error(&reply).0, "api_error");
    let reply = messages(api.addr, body("too-long", true)).await;
    assert_eq!(
        reply.status, 400,
        "a client error before the stream: {}",
        reply.body
    );
    assert_eq!(anthropic_error(&reply).0, "invalid_request_error");

    // The body checks of every route, in Anthropic's shape.
    let reply = send_with(api.addr, "POST", "/v1/messages", None, &[]).await;
    assert_eq!(reply.status, 415);
    assert_eq!(anthropic_error(&reply).0, "invalid_request_error");
    let reply = call(api.addr, "POST", "/v1/messages", Some("{not json".into())).await;
    assert_eq!(reply.status, 400);
    anthropic_error(&reply);
    let reply = call(api.addr, "GET", "/v1/messages", None).await;
    assert_eq!(reply.status, 405);
    anthropic_error(&reply);
    let reply = call(api.addr, "POST", "/v1/messages/batches", Some("{}".into())).await;
    assert_eq!(reply.status, 404);
    assert_eq!(anthropic_error(&reply).0, "not_found_error");
    // Other routes keep OpenAI's shape.
    let reply = call(api.addr, "GET", "/v1/nothing", None).await;
    assert_eq!(reply.status, 404);
    openai_error(&reply);
    api.stop().await;
}

#[tokio::test]
async fn a_runner_death_before_output_is_retried_and_one_after_is_an_error_event() {
    let api = start().await;
    for stream in [false, true] {
        let reply = messages(api.addr, body("flaky", stream)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        if stream {
            let events = events(&reply.body);
            assert_eq!(events.last().map(|(n, _)| n.as_str()), Some("message_stop"));
        } else {
            assert_eq!(reply.json()["content"][0]["text"], "Hello, world");
        }
    }
    let waits: Vec<Option<Duration>> = api.fake.submits().iter().map(|s| s.1).collect();
    assert_eq!(
        waits,
        vec![None, Some(RETRY_WAIT), None, Some(RETRY_WAIT)],
        "each retried once, waiting for a Ready instance"
    );

    let reply = messages(api.addr, body("fail-mid", true)).await;
    assert_eq!(reply.status, 200);
    let events = events(&reply.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "error",
        ],
        "{}",
        reply.body
    );
    let error = &events[5].1;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{error}"
    );
    let reply = messages(api.addr, body("fail-mid", false)).await;
    assert_eq!(reply.status, 502);
    assert_eq!(anthropic_error(&reply).0, "api_error");
    api.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_its_task() {
    disconnect_mid_stream_cancels("/v1/messages", body("endless", true).to_string(), |seen| {
        seen.matches("content_block_delta").count() >= 6
    })
    .await;
}

#[tokio::test]
async fn the_api_key_is_taken_from_x_api_key_and_refusals_are_anthropic_shaped() {
    let key = "0123456789abcdef0123456789abcdef";
    let api = start_with(ApiConfig {
        api_key: Some(canopy_actors::api::ApiKey::new(key).expect("key")),
        ..config()
    })
    .await;
    let request = Some(body("scripted", false).to_string());
    let reply = send_with(api.addr, "POST", "/v1/messages", request.clone(), &[]).await;
    assert_eq!(reply.status, 401);
    assert!(reply.headers.contains_key("www-authenticate"));
    let (kind, message) = anthropic_error(&reply);
    assert_eq!(kind, "authentication_error");
    assert!(message.contains("x-api-key"), "{message}");
    let reply = send_with(
        api.addr,
        "POST",
        "/v1/messages",
        request.clone(),
        &[("x-api-key", "wrong-key-0123456789abcdef")],
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(anthropic_error(&reply).0, "authentication_error");
    let authorization = format!("Bearer {key}");
    for header in [
        ("x-api-key", key),
        ("authorization", authorization.as_str()),
    ] {
        let reply = send_with(
            api.addr,
            "POST",
            "/v1/messages",
            request.clone(),
            &[header, ("anthropic-version", "2023-06-01")],
        )
        .await;
        assert_eq!(reply.status, 200, "{header:?}: {}", reply.body);
        assert_eq!(reply.json()["type"], "message");
    }
    // x-api-key is taken on every route; refusals elsewhere keep their route's shape.
    let reply = send_with(api.addr, "GET", "/v1/models", None, &[("x-api-key", key)]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = call(api.addr, "GET", "/v1/models", None).await;
    assert_eq!(reply.status, 401);
    openai_error(&reply);
    api.stop().await;
}

#[tokio::test]
async fn count_tokens_asks_for_a_zero_budget_and_answers_the_prompt_tokens() {
    let api = start().await;
    let count = |body: Value| {
        send_with(
            api.addr,
            "POST",
            "/v1/messages/count_tokens",
            Some(body.to_string()),
            &[],
        )
    };
    let reply = count(json!({"model": "scripted", "system": "Be brief.",
               "tools": [{"name": "add", "input_schema": {"type": "object"}}],
               "messages": [{"role": "user", "content": "hi"}]}))
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({"input_tokens": 7}));
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    assert_eq!(request.params.max_tokens, 0);
    assert_eq!(request.tools.len(), 1);

    for (body, field) in [
        (json!({"model": "scripted", "messages": []}), "messages"),
        (
            json!({"model": "scripted", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens",
        ),
    ] {
        let reply = count(body).await;
        assert_eq!(reply.status, 400, "{}", reply.body);
        let (kind, message) = anthropic_error(&reply);
        assert_eq!(kind, "invalid_request_error");
        assert!(message.contains(field), "{message}");
    }
    api.stop().await;
}
