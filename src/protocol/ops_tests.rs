use super::*;

fn ok(text: &str) -> Request {
    parse(text, &OpLimits::default()).expect("valid op")
}

fn err(text: &str) -> OpError {
    parse(text, &OpLimits::default()).expect_err("invalid op")
}

#[test]
fn parses_every_op() {
    assert_eq!(
        ok(r#"{"op":"subscribe","users":["a","b"]}"#).op,
        Op::Subscribe(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        ok(r#"{"op":"unsubscribe","users":[]}"#).op,
        Op::Unsubscribe(vec![])
    );
    assert_eq!(
        ok(r#"{"op":"subscribe_group","group":"g"}"#).op,
        Op::SubscribeGroup("g".into())
    );
    assert_eq!(
        ok(r#"{"op":"unsubscribe_group","group":"g"}"#).op,
        Op::UnsubscribeGroup("g".into())
    );
    assert_eq!(
        ok(r#"{"op":"set_status","status":"busy","text":"in a call"}"#).op,
        Op::SetStatus {
            status: Status::Busy,
            text: Some("in a call".into())
        }
    );
    assert_eq!(
        ok(r#"{"op":"activity","kind":"typing","to":"bob"}"#).op,
        Op::Activity {
            kind: "typing".into(),
            to: Some("bob".into())
        }
    );
    assert_eq!(
        ok(r#"{"op":"refresh","token":"t"}"#).op,
        Op::Refresh("t".into())
    );
    assert_eq!(ok(r#"{"op":"ping"}"#).op, Op::Ping);
}

#[test]
fn echoes_ids_verbatim() {
    let r = ok(r#"{"op":"ping","id":"abc"}"#);
    assert_eq!(r.id.unwrap().get(), r#""abc""#);
    let r = ok(r#"{"id": 42, "op":"ping"}"#);
    assert_eq!(r.id.unwrap().get(), "42");
    let e = err(r#"{"op":"ping","id":{"x":1}}"#);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.id.is_none());
}

#[test]
fn bad_input_is_a_typed_error_with_the_id_when_known() {
    let e = err("not json");
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.starts_with("invalid JSON"), "{}", e.message);

    let e = err(r#"{"op":"subscribe","users":"alice","id":7}"#);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(
        e.id.unwrap().get(),
        "7",
        "id echoed even when a field has the wrong type"
    );

    let e = err(r#"{"op":"fly","id":"x"}"#);
    assert_eq!(e.code, ErrorCode::UnknownOp);
    assert_eq!(e.message, "unknown op `fly`");

    assert_eq!(err(r#"{"id":1}"#).message, "missing field `op`");
    assert_eq!(err(r#"{"op":5}"#).message, "`op` must be a string");
    assert_eq!(err(r#"[1,2]"#).code, ErrorCode::BadRequest);
    assert_eq!(
        err(r#"{"op":"subscribe"}"#).message,
        "missing field `users`"
    );
    assert!(err(r#"{"op":"set_status","status":"sleeping"}"#)
        .message
        .contains("unknown status"));
}

#[test]
fn limits_are_enforced() {
    let limits = OpLimits {
        max_users_per_op: 2,
        max_id_bytes: 4,
        max_text_chars: 3,
        max_kind_chars: 2,
    };
    let p = |t: &str| parse(t, &limits);
    assert!(p(r#"{"op":"subscribe","users":["a","b","c"]}"#).is_err());
    assert!(p(r#"{"op":"subscribe","users":["abcde"]}"#).is_err());
    assert!(p(r#"{"op":"subscribe","users":[""]}"#).is_err());
    assert!(p(r#"{"op":"set_status","status":"away","text":"ééé"}"#).is_ok());
    assert!(p(r#"{"op":"set_status","status":"away","text":"éééé"}"#).is_err());
    assert!(p(r#"{"op":"activity","kind":"typ"}"#).is_err());
    assert!(p(r#"{"op":"activity","kind":""}"#).is_err());
}

proptest::proptest! {
    /// Whatever arrives, parsing returns a value or an error: it never panics.
    #[test]
    fn never_panics(s in ".{0,200}") {
        let _ = parse(&s, &OpLimits::default());
    }

    #[test]
    fn never_panics_on_op_shaped_input(op in "[a-z_]{0,20}", field in "[a-z]{1,8}", v in ".{0,30}") {
        let text = format!(r#"{{"op":"{op}","{field}":{v:?},"id":{v:?}}}"#);
        let _ = parse(&text, &OpLimits::default());
    }
}

#[test]
fn op_names_with_json_escapes_are_decoded() {
    assert_eq!(ok(r#"{"op":"\u0070ing"}"#).op, Op::Ping);
    assert_eq!(
        ok(r#"{"op":"set_\u0073tatus","status":"b\u0075sy"}"#).op,
        Op::SetStatus {
            status: Status::Busy,
            text: None
        }
    );
    assert_eq!(
        ok(r#"{"op":"subscribe\u005fgroup","group":"t\u0065am"}"#).op,
        Op::SubscribeGroup("team".into())
    );
    let e = err(r#"{"op":"\u0074eleport","id":1}"#);
    assert_eq!(e.code, ErrorCode::UnknownOp);
    assert!(e.message.contains("`teleport`"), "{}", e.message);
    // An escape that decodes to nothing valid is still a bad string, not a crash.
    assert_eq!(err(r#"{"op":"\ud800"}"#).code, ErrorCode::BadRequest);
}

#[test]
fn op_names_borrow_unless_escaped() {
    use std::borrow::Cow;
    let Id(plain) = serde_json::from_str::<Id>(r#""ping""#).unwrap();
    assert!(matches!(plain, Cow::Borrowed("ping")));
    let Id(escaped) = serde_json::from_str::<Id>(r#""\u0070ing""#).unwrap();
    assert!(matches!(escaped, Cow::Owned(ref s) if s == "ping"));
}
