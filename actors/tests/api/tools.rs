//! Tool calls on the three APIs against the scripted fake of `api.rs`: the tools reach the
//! engine request, a call the model writes (the `caller` model) comes back in each API's
//! shape, plain and streamed, and a forced call carries its grammar.

use super::*;

async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    call(addr, "POST", path, Some(body.to_string())).await
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}})
}

fn openai_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "tools": [weather_tool()],
           "messages": [{"role": "user", "content": "Weather in Paris?"}]})
}

#[tokio::test]
async fn an_openai_answer_with_a_call_has_tool_calls_and_finish_reason_tool_calls() {
    let api = start().await;
    let reply = chat(api.addr, openai_body("caller", false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me check. ");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("text")).expect("json");
    assert_eq!(args, json!({"city": "Paris"}));

    // The tools reached the engine request; with tool_choice auto there is no grammar.
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    assert_eq!(request.tools.len(), 1);
    assert_eq!(request.tools[0].name, "get_weather");
    assert_eq!(request.params.constraint, None);

    // Without tools the same answer is plain text.
    let mut plain = openai_body("caller", false);
    plain.as_object_mut().expect("object").remove("tools");
    let reply = chat(api.addr, plain).await;
    let body = reply.json();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("<tool_call>"))
    );
    api.stop().await;
}

#[tokio::test]
async fn an_openai_stream_holds_the_call_back_and_sends_it_as_one_delta() {
    let api = start().await;
    let reply = chat(api.addr, openai_body("caller", true)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let data = sse_data(&reply.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = sse_json(&data[..data.len() - 1]);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Let me check. ", "no part of the tag is shown");
    let calls: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"].get("tool_calls").is_some())
        .collect();
    assert_eq!(calls.len(), 1, "{}", reply.body);
    let call = &calls[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["index"], 0);
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
    api.stop().await;
}

#[tokio::test]
async fn a_forced_openai_call_carries_its_grammar_and_tool_turns_reach_the_engine() {
    let api = start().await;
    let mut body = openai_body("scripted", false);
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    body["messages"] = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}
    ]);
    let reply = chat(api.addr, body).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    match &request.params.constraint {
        Some(canopy_proto::Constraint::ToolCall(tools)) => {
            assert_eq!(tools.len(), 1);
            assert_eq!(tools[0].name, "get_weather");
        }
        other => panic!("a tool-call grammar, not {other:?}"),
    }
    let canopy_proto::Prompt::Chat(turns) = &request.prompt else {
        panic!("a chat prompt")
    };
    assert_eq!(turns[1].tool_calls[0].id, "call_9");
    assert_eq!(turns[2].role, "tool");
    assert_eq!(turns[2].tool_call_id.as_deref(), Some("call_9"));

    // tool_choice none: the tools are not shown and nothing is read as a call.
    let mut off = openai_body("caller", false);
    off["tool_choice"] = json!("none");
    let reply = chat(api.addr, off).await;
    assert_eq!(reply.json()["choices"][0]["finish_reason"], "stop");
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    assert!(request.tools.is_empty());
    api.stop().await;
}

fn anthropic_body(stream: bool) -> Value {
    json!({"model": "caller", "max_tokens": 64, "stream": stream,
           "tools": [{"name": "get_weather", "description": "The weather in a city.",
                      "input_schema": {"type": "object",
                                       "properties": {"city": {"type": "string"}}}}],
           "messages": [{"role": "user", "content": "Weather in Paris?"}]})
}

#[tokio::test]
async fn an_anthropic_answer_with_a_call_has_a_tool_use_block() {
    let api = start().await;
    let reply = super::anthropic::messages(api.addr, anthropic_body(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["stop_reason"], "tool_use");
    let content = body["content"].as_array().expect("content");
    assert_eq!(content.len(), 2, "{body}");
    assert_eq!(
        content[0],
        json!({"type": "text", "text": "Let me check. "})
    );
    assert_eq!(content[1]["type"], "tool_use");
    assert!(
        content[1]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("toolu_"))
    );
    assert_eq!(content[1]["name"], "get_weather");
    assert_eq!(content[1]["input"], json!({"city": "Paris"}));

    let reply = super::anthropic::messages(api.addr, anthropic_body(true)).await;
    let events = super::anthropic::events(&reply.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let tail = &names[names.len() - 6..];
    assert_eq!(
        tail,
        [
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "{names:?}"
    );
    let start = &events[names.len() - 5].1;
    assert_eq!(start["index"], 1);
    assert_eq!(start["content_block"]["type"], "tool_use");
    assert_eq!(start["content_block"]["input"], json!({}));
    let delta = &events[names.len() - 4].1;
    assert_eq!(delta["delta"]["type"], "input_json_delta");
    assert_eq!(delta["delta"]["partial_json"], r#"{"city":"Paris"}"#);
    assert_eq!(
        events[names.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );
    api.stop().await;
}

#[tokio::test]
async fn an_ollama_answer_with_a_call_has_tool_calls_plain_and_streamed() {
    let api = start().await;
    let body = |stream: bool| {
        json!({"model": "caller", "stream": stream, "tools": [weather_tool()],
               "messages": [{"role": "user", "content": "Weather in Paris?"},
                            {"role": "assistant", "content": "",
                             "tool_calls": [{"function": {"name": "get_weather",
                                                          "arguments": {"city": "Rome"}}}]},
                            {"role": "tool", "tool_name": "get_weather", "content": "rain"},
                            {"role": "user", "content": "And Paris?"}]})
    };
    let reply = post(api.addr, "/api/chat", body(false)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let object = reply.json();
    assert_eq!(object["message"]["content"], "Let me check. ");
    assert_eq!(
        object["message"]["tool_calls"],
        json!([{"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}])
    );
    let (_, _, request) = api.fake.submits().pop().expect("submitted");
    let canopy_proto::Prompt::Chat(turns) = &request.prompt else {
        panic!("a chat prompt")
    };
    assert_eq!(turns[1].tool_calls[0].arguments, r#"{"city":"Rome"}"#);
    assert_eq!(turns[2].name.as_deref(), Some("get_weather"));

    let reply = post(api.addr, "/api/chat", body(true)).await;
    let lines: Vec<Value> = reply
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let with_calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"].get("tool_calls").is_some())
        .collect();
    assert_eq!(with_calls.len(), 1, "{}", reply.body);
    assert_eq!(with_calls[0]["done"], false);
    assert_eq!(lines.last().expect("a line")["done"], true);
    api.stop().await;
}
