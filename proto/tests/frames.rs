//! Property tests of the runner protocol framing: every message round-trips through both
//! the blocking and the tokio codec paths, and no byte string makes the decoder panic.

use bytes::BytesMut;
use canopy_proto::frame::{decode_body, encode_frame};
use canopy_proto::*;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn arb_prompt() -> impl Strategy<Value = Prompt> {
    prop_oneof![
        any::<String>().prop_map(Prompt::Text),
        prop::collection::vec(
            (any::<String>(), any::<String>())
                .prop_map(|(role, content)| ChatMessage::new(role, content)),
            0..4
        )
        .prop_map(Prompt::Chat),
    ]
}

fn arb_params() -> impl Strategy<Value = GenerateParams> {
    (
        any::<u32>(),
        0.0f32..2.0,
        0.0f32..1.0,
        proptest::option::of(any::<u32>()),
        any::<u64>(),
        prop::collection::vec(any::<String>(), 0..3),
        (
            -2.0f32..2.0,
            -2.0f32..2.0,
            prop::collection::vec((any::<u32>(), -100.0f32..100.0), 0..4),
            proptest::option::of(0u8..=20),
            proptest::option::of(prop_oneof![
                Just(Constraint::JsonObject),
                any::<String>().prop_map(Constraint::JsonSchema),
            ]),
        ),
    )
        .prop_map(
            |(
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                (presence_penalty, frequency_penalty, logit_bias, logprobs, constraint),
            )| GenerateParams {
                max_tokens,
                temperature,
                top_p,
                top_k,
                seed,
                stop,
                presence_penalty,
                frequency_penalty,
                logit_bias,
                logprobs,
                constraint,
            },
        )
}

fn arb_logprob() -> impl Strategy<Value = TokenLogprob> {
    (
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..4),
        -30.0f32..0.0,
        prop::collection::vec(
            (
                any::<u32>(),
                prop::collection::vec(any::<u8>(), 0..4),
                -30.0f32..0.0,
            ),
            0..3,
        ),
    )
        .prop_map(|(token, bytes, logprob, top)| TokenLogprob {
            token,
            bytes,
            logprob,
            top: top
                .into_iter()
                .map(|(token, bytes, logprob)| TopLogprob {
                    token,
                    bytes,
                    logprob,
                })
                .collect(),
        })
}

fn arb_handshake() -> impl Strategy<Value = Handshake> {
    (any::<String>(), any::<u32>(), any::<u32>()).prop_map(|(magic, version, pid)| Handshake {
        magic,
        version,
        pid,
    })
}

fn arb_to_runner() -> impl Strategy<Value = ToRunner> {
    prop_oneof![
        arb_handshake().prop_map(ToRunner::Handshake),
        (
            any::<String>(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(model, layer_start, layer_end, threads)| ToRunner::Load(
                LoadSpec {
                    model,
                    layer_start,
                    layer_end,
                    threads,
                    parallel: threads,
                }
            )),
        (any::<u64>(), arb_prompt(), arb_params()).prop_map(|(task_id, prompt, params)| {
            ToRunner::Generate {
                task_id,
                request: GenerateRequest {
                    prompt,
                    params,
                    tools: Vec::new(),
                },
            }
        }),
        any::<u64>().prop_map(|task_id| ToRunner::Cancel { task_id }),
        Just(ToRunner::Shutdown),
    ]
}

fn arb_status() -> impl Strategy<Value = RunnerStatus> {
    prop_oneof![
        Just(RunnerStatus::Idle),
        Just(RunnerStatus::Loading),
        Just(RunnerStatus::Loaded),
        Just(RunnerStatus::Ready),
        Just(RunnerStatus::Running),
        Just(RunnerStatus::ShuttingDown),
        Just(RunnerStatus::Shutdown),
        Just(RunnerStatus::Failed),
    ]
}

fn arb_from_runner() -> impl Strategy<Value = FromRunner> {
    let phase = prop_oneof![
        Just(Phase::Loading),
        Just(Phase::Prefill),
        Just(Phase::Decode)
    ];
    let finish = prop_oneof![
        Just(FinishReason::Stop),
        any::<u32>().prop_map(FinishReason::StopSequence),
        Just(FinishReason::Length),
        Just(FinishReason::Cancelled)
    ];
    prop_oneof![
        arb_handshake().prop_map(FromRunner::Handshake),
        any::<u64>().prop_map(|seq| FromRunner::Heartbeat { seq }),
        arb_status().prop_map(FromRunner::Status),
        (any::<u32>(), any::<u32>())
            .prop_map(|(done, total)| FromRunner::LoadProgress { done, total }),
        any::<String>().prop_map(|error| FromRunner::LoadFailed { error }),
        any::<u64>().prop_map(|task_id| FromRunner::Ack { task_id }),
        any::<u64>().prop_map(|task_id| FromRunner::Started { task_id }),
        (any::<u64>(), phase).prop_map(|(task_id, phase)| FromRunner::Progress { task_id, phase }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<String>(),
            prop::collection::vec(any::<u32>(), 0..8),
            prop::collection::vec(arb_logprob(), 0..2)
        )
            .prop_map(
                |(task_id, index, text, token_ids, logprobs)| FromRunner::Chunk {
                    task_id,
                    chunk: TokenChunk {
                        index,
                        text,
                        token_ids,
                        logprobs
                    }
                }
            ),
        (any::<u64>(), finish, any::<u32>(), any::<u32>()).prop_map(
            |(task_id, finish_reason, prompt_tokens, completion_tokens)| FromRunner::Done {
                task_id,
                finish_reason,
                usage: Usage {
                    prompt_tokens,
                    completion_tokens
                }
            }
        ),
        (any::<u64>(), any::<String>(), 0..3u8).prop_map(|(task_id, error, kind)| {
            FromRunner::TaskError {
                task_id,
                error,
                kind: match kind {
                    0 => TaskErrorKind::Internal,
                    1 => TaskErrorKind::InvalidRequest,
                    _ => TaskErrorKind::ContextLengthExceeded,
                },
            }
        }),
        (any::<[u32; 4]>(), any::<[u64; 5]>()).prop_map(|(n, b)| FromRunner::Batch(BatchStats {
            parallel: n[0],
            running: n[1],
            queued: n[2],
            last_step_rows: n[3],
            kv_bytes: b[0],
            kv_capacity_bytes: b[1],
            prefix_hits: b[2],
            prefix_reused_tokens: b[3],
            prefilled_tokens: b[4],
        })),
    ]
}

proptest! {
    #[test]
    fn to_runner_round_trips(msg in arb_to_runner()) {
        let frame = encode_frame(&msg, MAX_FRAME_LEN).unwrap();
        let back: ToRunner = read_frame(&mut frame.as_slice(), MAX_FRAME_LEN).unwrap().unwrap();
        prop_assert_eq!(&back, &msg);

        let mut codec = FrameCodec::<ToRunner, ToRunner>::new();
        let mut buf = BytesMut::new();
        codec.encode(msg.clone(), &mut buf).unwrap();
        prop_assert_eq!(&buf[..], &frame[..]);
        let back = codec.decode(&mut buf).unwrap().unwrap();
        prop_assert_eq!(back, msg);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn from_runner_round_trips_in_a_stream(msgs in prop::collection::vec(arb_from_runner(), 1..8), split in any::<prop::sample::Index>()) {
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m, MAX_FRAME_LEN).unwrap());
        }
        // Feed the stream in two arbitrary pieces: frames split anywhere must still decode.
        let cut = split.index(bytes.len() + 1);
        let mut codec = FrameCodec::<FromRunner, FromRunner>::new();
        let mut buf = BytesMut::from(&bytes[..cut]);
        let mut out = Vec::new();
        while let Some(m) = codec.decode(&mut buf).unwrap() { out.push(m); }
        buf.extend_from_slice(&bytes[cut..]);
        while let Some(m) = codec.decode_eof(&mut buf).unwrap() { out.push(m); }
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_frame::<FromRunner, _>(&mut bytes.as_slice(), 1024);
        let _ = read_frame::<ToRunner, _>(&mut bytes.as_slice(), 1024);
        let _ = decode_body::<FromRunner>(&bytes);
        let mut codec = FrameCodec::<ToRunner, ToRunner>::with_max(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode_eof(&mut buf) {}
    }

    #[test]
    fn random_body_with_valid_prefix_is_a_typed_error(body in prop::collection::vec(any::<u8>(), 1..256)) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend(&body);
        match read_frame::<ToRunner, _>(&mut frame.as_slice(), MAX_FRAME_LEN) {
            Ok(Some(_)) | Err(ProtoError::Malformed(_)) => {}
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

#[test]
fn truncated_frame_is_a_typed_error() {
    let frame = encode_frame(&ToRunner::Shutdown, MAX_FRAME_LEN).unwrap();
    for cut in 1..frame.len() {
        let err = read_frame::<ToRunner, _>(&mut &frame[..cut], MAX_FRAME_LEN).unwrap_err();
        assert!(matches!(err, ProtoError::Truncated { .. }), "{err:?}");
        let mut codec = FrameCodec::<ToRunner, ToRunner>::new();
        let mut buf = BytesMut::from(&frame[..cut]);
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert!(matches!(err, ProtoError::Truncated { .. }), "{err:?}");
    }
    assert!(
        read_frame::<ToRunner, _>(&mut &[][..], MAX_FRAME_LEN)
            .unwrap()
            .is_none()
    );
}

#[test]
fn oversized_frame_is_refused_before_reading_its_body() {
    let prefix = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
    let err = read_frame::<ToRunner, _>(&mut &prefix[..], MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err:?}");
    let mut codec = FrameCodec::<ToRunner, ToRunner>::new();
    let err = codec.decode(&mut BytesMut::from(&prefix[..])).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err:?}");
    let big = ToRunner::Load(LoadSpec {
        model: "x".repeat(2048),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    });
    assert!(matches!(
        encode_frame(&big, 1024),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn handshake_checks_magic_and_version() {
    assert!(Handshake::ours().check().is_ok());
    let mut h = Handshake::ours();
    h.version = PROTOCOL_VERSION + 1;
    assert!(
        matches!(h.check(), Err(ProtoError::VersionMismatch { theirs, .. }) if theirs == PROTOCOL_VERSION + 1)
    );
    let mut h = Handshake::ours();
    h.magic = "redis".into();
    assert!(matches!(h.check(), Err(ProtoError::BadHandshake(_))));
}

#[test]
fn a_frame_of_another_message_type_is_malformed_not_a_panic() {
    let frame = encode_frame(&FromRunner::Heartbeat { seq: 1 }, MAX_FRAME_LEN).unwrap();
    let err = read_frame::<ToRunner, _>(&mut frame.as_slice(), MAX_FRAME_LEN).unwrap_err();
    assert!(matches!(err, ProtoError::Malformed(_)), "{err:?}");
}
