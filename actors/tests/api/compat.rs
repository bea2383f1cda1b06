//! OpenAI's legacy completions (`/v1/completions`) and Ollama's API (`/api/...`) against the
//! scripted fake of `api.rs`: shapes, framing, field refusals, and the shared machinery
//! (retry before output, a runner death mid-stream, cancellation on disconnect, capacity,
//! the API key guard).

use super::*;

async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    call(addr, "POST", path, Some(body.to_string())).await
}

/// The JSON objects of an NDJSON body, one a line.
fn ndjson(body: &str) -> Vec<Value> {
    assert!(body.ends_with('\n'), "NDJSON ends with a newline: {body:?}");
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Checks Ollama's error shape (`{"error": "..."}`) and returns the message.
fn ollama_error(reply: &Reply) -> String {
    let body = reply.json();
    let object = body.as_object().expect("an object");
    assert_eq!(object.len(), 1, "only `error`: {}", reply.body);
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error is not a string: {}", reply.body))
        .to_string()
}

// ---------------------------------------------------------------------------------------
// /v1/completions

#[tokio::test]
async fn a_text_completion_sends_the_raw_prompt_and_answers_in_openai_shape() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "scripted", "prompt": "Once upon", "temperature": 0, "seed": 3}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert!(
        json["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_eq!(json["object"], "text_completion");
    assert_eq!(json["model"], "scripted");
    assert_eq!(json["choices"][0]["text"], "Hello, world");
    assert_eq!(json["choices"][0]["index"], 0);
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert!(json["choices"][0]["logprobs"].is_null());
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    let submits = api.fake.submits();
    assert_eq!(submits.len(), 1);
    let request = &submits[0].2;
    assert_eq!(
        request.prompt,
        Prompt::Text("Once upon".into()),
        "no chat template"
    );
    assert_eq!(request.params.max_tokens, 16, "OpenAI's default");
    assert_eq!((request.params.temperature, request.params.seed), (0.0, 3));
    api.stop().await;
}

#[tokio::test]
async fn several_prompts_are_several_tasks_and_echo_prepends_each_prompt() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "scripted", "prompt": ["A: ", "B: "], "echo": true, "max_tokens": 5}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    let choices = json["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["text"], "A: Hello, world");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[1]["text"], "B: Hello, world");
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 14, "completion_tokens": 6, "total_tokens": 20})
    );
    let mut prompts: Vec<Prompt> = api.fake.submits().into_iter().map(|s| s.2.prompt).collect();
    prompts.sort_by_key(|p| p.to_plain_text());
    assert_eq!(
        prompts,
        vec![Prompt::Text("A: ".into()), Prompt::Text("B: ".into())]
    );
    api.stop().await;
}

#[tokio::test]
async fn a_completion_stream_sends_text_completion_chunks_usage_and_done() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "scripted", "prompt": "Hi", "stream": true, "echo": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .is_ok_and(|t| t.starts_with("text/event-stream"))
    );
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks = sse_json(&data);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    let (last, pieces) = chunks.split_last().expect("chunks");
    assert_eq!(last["choices"], json!([]), "the usage chunk has no choices");
    assert_eq!(last["usage"]["total_tokens"], 10);
    assert!(pieces.iter().all(|c| c["usage"].is_null()));
    let text: String = pieces
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, "HiHello, world", "the echoed prompt, then the answer");
    let finishes: Vec<&Value> = pieces
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec![&json!("stop")]);
    api.stop().await;
}

#[tokio::test]
async fn a_completion_stream_of_two_prompts_finishes_each_choice() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "scripted", "prompt": ["x", "y"], "stream": true}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let chunks = sse_json(&sse_data(&reply.body));
    for index in [0, 1] {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .collect();
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, "Hello, world", "choice {index}");
        assert_eq!(
            mine.last().expect("chunks")["choices"][0]["finish_reason"],
            "stop"
        );
        assert!(
            mine.iter().all(|c| c.get("usage").is_none()),
            "no usage asked"
        );
    }
    api.stop().await;
}

#[tokio::test]
async fn refused_completion_fields_are_openai_400s_naming_them() {
    let api = start().await;
    for (extra, param) in [
        (json!({"suffix": "!"}), "suffix"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"logprobs": 1, "echo": true}), "echo"),
        (json!({"n": 17}), "n"),
        (json!({"best_of": 2}), "best_of"),
        (json!({"logit_bias": {"one": 5}}), "logit_bias"),
        (json!({"presence_penalty": 3.0}), "presence_penalty"),
        (json!({"frobnicate": true}), "frobnicate"),
        (json!({"prompt": [1, 2, 3]}), "prompt"),
    ] {
        let mut body = json!({"model": "scripted", "prompt": "x"});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let reply = post(api.addr, "/v1/completions", body).await;
        assert_eq!(reply.status, 400, "{param}: {}", reply.body);
        let error = openai_error(&reply);
        assert_eq!(error["param"], param, "{}", reply.body);
    }
    assert!(
        api.fake.submits().is_empty(),
        "nothing refused reached a runner"
    );
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "nope", "prompt": "x"}),
    )
    .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(openai_error(&reply)["code"], "model_not_found");
    api.stop().await;
}

#[tokio::test]
async fn completions_share_the_retry_and_the_mid_stream_error() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "flaky", "prompt": "x"}),
    )
    .await;
    assert_eq!(reply.status, 200, "retried once: {}", reply.body);
    assert_eq!(reply.json()["choices"][0]["text"], "Hello, world");
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "fail-mid", "prompt": "x", "stream": true}),
    )
    .await;
    assert_eq!(reply.status, 200);
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events = sse_json(&data);
    let error = events.last().expect("events");
    assert_eq!(error["error"]["code"], "runner_failed", "{data:?}");
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "busy", "prompt": "x"}),
    )
    .await;
    assert_eq!(reply.status, 429);
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "too-long", "prompt": "x", "stream": true}),
    )
    .await;
    assert_eq!(
        reply.status, 400,
        "a client error before the stream: {}",
        reply.body
    );
    api.stop().await;
}

// ---------------------------------------------------------------------------------------
// Ollama: /api/chat, /api/generate

#[tokio::test]
async fn ollama_chat_streams_ndjson_by_default_and_ends_with_counts_and_durations() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/api/chat",
        json!({"model": "scripted", "messages": [{"role": "user", "content": "Hi"}],
               "options": {"temperature": 0, "num_predict": 9}}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/x-ndjson");
    let objects = ndjson(&reply.body);
    let (last, pieces) = objects.split_last().expect("objects");
    assert!(
        pieces
            .iter()
            .all(|o| o["done"] == false && o["model"] == "scripted")
    );
    let text: String = pieces
        .iter()
        .map(|o| {
            assert_eq!(o["message"]["role"], "assistant");
            o["message"]["content"].as_str().expect("content")
        })
        .collect();
    assert_eq!(text, "Hello, world");
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["message"]["content"], "");
    assert_eq!(last["prompt_eval_count"], 7);
    assert_eq!(last["eval_count"], 3);
    for field in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(last[field].is_u64(), "{field}: {last}");
    }
    assert!(last["total_duration"].as_u64() >= last["eval_duration"].as_u64());
    assert!(
        last["created_at"]
            .as_str()
            .is_some_and(|t| t.len() > 20 && t.ends_with('Z'))
    );
    let request = &api.fake.submits()[0].2;
    assert_eq!(
        (request.params.max_tokens, request.params.temperature),
        (9, 0.0)
    );
    api.stop().await;
}

#[tokio::test]
async fn ollama_chat_and_generate_without_streaming_answer_one_object() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/api/chat",
        json!({"model": "scripted", "stream": false,
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["message"]["content"], "Hello, world");
    assert_eq!(json["done"], true);
    assert_eq!(json["eval_count"], 3);

    let reply = post(
        api.addr,
        "/api/generate",
        json!({"model": "scripted", "stream": false, "prompt": "Why?", "system": "Be brief."}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    assert_eq!(json["response"], "Hello, world");
    assert_eq!(json["done_reason"], "stop");
    let Prompt::Chat(messages) = &api.fake.submits()[1].2.prompt else {
        panic!("generate renders through the chat template");
    };
    assert_eq!(
        messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect::<Vec<_>>(),
        vec![("system", "Be brief."), ("user", "Why?")]
    );

    let reply = post(
        api.addr,
        "/api/generate",
        json!({"model": "scripted:latest", "stream": false, "prompt": "Once", "raw": true}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["model"],
        "scripted:latest",
        "answered with the name asked"
    );
    let (model, _, request) = &api.fake.submits()[2];
    assert_eq!(model, "scripted", ":latest is the untagged model");
    assert_eq!(request.prompt, Prompt::Text("Once".into()));
    api.stop().await;
}

#[tokio::test]
async fn an_empty_ollama_request_loads_the_model() {
    let api = start().await;
    let reply = post(api.addr, "/api/generate", json!({"model": "scripted"})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let objects = ndjson(&reply.body);
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0]["done_reason"], "load");
    assert_eq!(objects[0]["done"], true);
    let reply = post(
        api.addr,
        "/api/chat",
        json!({"model": "scripted", "messages": [], "stream": false}),
    )
    .await;
    assert_eq!(reply.json()["done_reason"], "load");
    let reply = post(
        api.addr,
        "/api/chat",
        json!({"model": "nope", "messages": []}),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert!(ollama_error(&reply).contains("\"nope\" not found"));
    assert!(api.fake.submits().is_empty(), "a load generates nothing");
    api.stop().await;
}

#[tokio::test]
async fn ollama_errors_are_ollama_shaped_with_the_usual_statuses() {
    let api = start().await;
    let chat =
        |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "x"}]});
    let reply = post(api.addr, "/api/chat", chat("nope")).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert!(ollama_error(&reply).contains("\"nope\" not found"));
    let reply = post(api.addr, "/api/chat", chat("busy")).await;
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains_key("retry-after"));
    ollama_error(&reply);
    let reply = post(api.addr, "/api/chat", chat("cold")).await;
    assert_eq!(reply.status, 503);
    ollama_error(&reply);
    let reply = post(
        api.addr,
        "/api/generate",
        json!({"model": "too-long", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        reply.status, 400,
        "a client error before the stream: {}",
        reply.body
    );
    ollama_error(&reply);

    for (body, field) in [
        (
            json!({"model": "scripted", "prompt": "x", "format": "yaml"}),
            "format",
        ),
        (
            json!({"model": "scripted", "prompt": "x", "template": "{{.Prompt}}"}),
            "template",
        ),
        (
            json!({"model": "scripted", "prompt": "x", "context": [1]}),
            "context",
        ),
        (
            json!({"model": "scripted", "prompt": "x", "options": {"num_ctx": 8}}),
            "options.num_ctx",
        ),
        (
            json!({"model": "scripted", "prompt": "x", "options": {"mirostat": 1}}),
            "options.mirostat",
        ),
    ] {
        let reply = post(api.addr, "/api/generate", body).await;
        assert_eq!(reply.status, 400, "{field}: {}", reply.body);
        assert!(
            ollama_error(&reply).contains(&format!("'{field}'")),
            "{}",
            reply.body
        );
    }
    // The body checks of the OpenAI routes, in Ollama's shape.
    let (response, _conn) = send(api.addr, "POST", "/api/show", None).await;
    assert_eq!(response.status(), 415);
    let reply = call(api.addr, "POST", "/api/chat", Some("{not json".into())).await;
    assert_eq!(reply.status, 400);
    ollama_error(&reply);
    let reply = call(api.addr, "GET", "/api/nothing-here", None).await;
    assert_eq!(reply.status, 404);
    ollama_error(&reply);
    let reply = call(api.addr, "GET", "/api/chat", None).await;
    assert_eq!(reply.status, 405);
    ollama_error(&reply);
    assert!(api.fake.submits().iter().all(|s| s.0 != "scripted"));
    api.stop().await;
}

#[tokio::test]
async fn an_ollama_stream_retries_before_output_and_ends_with_an_error_line_after() {
    let api = start().await;
    let reply = post(
        api.addr,
        "/api/chat",
        json!({"model": "flaky", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let objects = ndjson(&reply.body);
    assert_eq!(
        objects.last().expect("objects")["done"],
        true,
        "retried: {objects:?}"
    );
    let reply = post(
        api.addr,
        "/api/generate",
        json!({"model": "fail-mid", "prompt": "x"}),
    )
    .await;
    assert_eq!(reply.status, 200);
    let objects = ndjson(&reply.body);
    let (last, pieces) = objects.split_last().expect("objects");
    assert_eq!(pieces.len(), 2, "{objects:?}");
    assert!(
        last["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{objects:?}"
    );
    api.stop().await;
}

#[tokio::test]
async fn an_ollama_client_that_disconnects_mid_stream_cancels_its_task() {
    disconnect_mid_stream_cancels(
        "/api/generate",
        json!({"model": "endless", "prompt": "x"}).to_string(),
        |seen| seen.lines().count() >= 3,
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Ollama: models

#[tokio::test]
async fn ollama_lists_shows_and_reports_running_models() {
    let api = start().await;
    let reply = call(api.addr, "GET", "/api/tags", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let tags = reply.json();
    let names: Vec<&str> = tags["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["scripted", "org/slashed", "cold"]);
    let first = &tags["models"][0];
    assert_eq!(first["model"], "scripted");
    assert_eq!(first["modified_at"], "2023-11-14T22:13:20Z");
    assert_eq!(first["details"]["parent_model"], "");

    let reply = call(api.addr, "GET", "/api/ps", None).await;
    assert_eq!(reply.status, 200);
    let running: Vec<Value> = reply.json()["models"].as_array().expect("models").clone();
    assert_eq!(
        running.len(),
        2,
        "the cold model has no Ready instance: {running:?}"
    );

    let reply = post(api.addr, "/api/show", json!({"model": "org/slashed"})).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let show = reply.json();
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert!(show["model_info"].is_object());
    let reply = post(api.addr, "/api/show", json!({"name": "nope"})).await;
    assert_eq!(reply.status, 404);
    assert!(ollama_error(&reply).contains("nope"));

    let reply = call(api.addr, "GET", "/api/version", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["version"], env!("CARGO_PKG_VERSION"));

    // Counted by route like every endpoint.
    let text = api.metrics.encode().expect("metrics");
    assert!(
        text.lines()
            .any(|l| l.starts_with("canopy_http_requests_total{")
                && l.contains("endpoint=\"/api/tags\"")),
        "{text}"
    );
    api.stop().await;
}

#[tokio::test]
async fn the_api_key_guards_ollamas_routes_in_ollamas_shape() {
    let key = "0123456789abcdef0123456789abcdef";
    let api = start_with(ApiConfig {
        api_key: Some(canopy_actors::api::ApiKey::new(key).expect("key")),
        ..config()
    })
    .await;
    let reply = call(api.addr, "GET", "/api/tags", None).await;
    assert_eq!(reply.status, 401);
    assert!(reply.headers.contains_key("www-authenticate"));
    ollama_error(&reply);
    let reply = post(
        api.addr,
        "/v1/completions",
        json!({"model": "scripted", "prompt": "x"}),
    )
    .await;
    assert_eq!(reply.status, 401);
    openai_error(&reply);
    api.stop().await;
}

#[tokio::test]
async fn ollama_logprobs_ride_on_each_object_when_asked_for() {
    let api = start().await;
    let body = |stream: bool, logprobs: bool| {
        json!({"model": "scripted", "stream": stream, "logprobs": logprobs, "top_logprobs": 0,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let reply = post(api.addr, "/api/chat", body(true, true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let lines = ndjson(&reply.body);
    let (pieces, end) = lines.split_at(lines.len() - 1);
    assert!(
        pieces.iter().all(|l| l["logprobs"].is_array()),
        "{}",
        reply.body
    );
    assert!(end[0].get("logprobs").is_none(), "{}", reply.body);
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    assert_eq!(request.params.logprobs, Some(0));

    let reply = post(api.addr, "/api/chat", body(false, true)).await;
    assert!(reply.json()["logprobs"].is_array(), "{}", reply.body);
    let reply = post(api.addr, "/api/chat", body(false, false)).await;
    assert!(reply.json().get("logprobs").is_none(), "{}", reply.body);
    api.stop().await;
}
