use super::*;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A masked client frame, as a browser would send it.
fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let h = FrameHeader {
        is_final: fin,
        opcode,
        mask: Some(MASK),
        ..FrameHeader::default()
    };
    let mut out = Vec::new();
    h.format(payload.len() as u64, &mut out).unwrap();
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    out
}

fn text(p: &str) -> Vec<u8> {
    client_frame(OpCode::Data(Data::Text), true, p.as_bytes())
}

fn drain(d: &mut Decoder) -> Vec<Inbound> {
    let mut out = Vec::new();
    while let Some(item) = d.decode().unwrap() {
        out.push(item);
    }
    out
}

#[test]
fn decodes_whole_and_byte_by_byte() {
    let mut wire = text(r#"{"op":"ping"}"#);
    wire.extend(client_frame(OpCode::Control(Control::Ping), true, b"hi"));
    let mut d = Decoder::new(1024, 4096);
    d.feed(&wire);
    assert_eq!(
        drain(&mut d),
        vec![
            Inbound::Text(Bytes::from_static(br#"{"op":"ping"}"#)),
            Inbound::Ping(Bytes::from_static(b"hi"))
        ]
    );
    let mut d = Decoder::new(1024, 4096);
    let mut got = Vec::new();
    for b in &wire {
        d.feed(std::slice::from_ref(b));
        got.extend(drain(&mut d));
    }
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0],
        Inbound::Text(Bytes::from_static(br#"{"op":"ping"}"#))
    );
}

#[test]
fn reassembles_fragments_around_control_frames() {
    let mut wire = client_frame(OpCode::Data(Data::Text), false, b"hel");
    wire.extend(client_frame(OpCode::Control(Control::Pong), true, b""));
    wire.extend(client_frame(OpCode::Data(Data::Continue), true, b"lo"));
    let mut d = Decoder::new(1024, 4096);
    d.feed(&wire);
    assert_eq!(
        drain(&mut d),
        vec![Inbound::Pong, Inbound::Text(Bytes::from_static(b"hello"))]
    );
}

#[test]
fn oversized_messages_are_skipped_then_the_next_one_decodes() {
    let big = "x".repeat(3000);
    let mut wire = text(&big);
    wire.extend(client_frame(OpCode::Data(Data::Binary), true, &[1, 2, 3]));
    wire.extend(text("ok"));
    let mut d = Decoder::new(1024, 4096);
    d.feed(&wire);
    assert_eq!(
        drain(&mut d),
        vec![
            Inbound::TooLarge(3000),
            Inbound::Binary(3),
            Inbound::Text(Bytes::from_static(b"ok"))
        ]
    );
    assert!(
        d.held_bytes() <= IDLE_BUF_KEEP,
        "large buffers are released at once"
    );
    d.release_if_idle();
    assert_eq!(d.held_bytes(), 0, "idle: nothing held");
}

#[test]
fn fragmented_message_over_the_soft_limit_is_too_large() {
    let part = "y".repeat(600);
    let mut wire = client_frame(OpCode::Data(Data::Text), false, part.as_bytes());
    wire.extend(client_frame(
        OpCode::Data(Data::Continue),
        true,
        part.as_bytes(),
    ));
    let mut d = Decoder::new(1024, 4096);
    d.feed(&wire);
    assert_eq!(drain(&mut d), vec![Inbound::TooLarge(1200)]);
}

#[test]
fn violations_are_errors_with_close_codes() {
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            client_frame(OpCode::Data(Data::Text), true, &vec![b'a'; 5000]),
            1009,
        ),
        (
            client_frame(OpCode::Data(Data::Text), true, &[0xff, 0xfe]),
            1007,
        ),
        (client_frame(OpCode::Data(Data::Continue), true, b"x"), 1002),
        (
            client_frame(OpCode::Control(Control::Ping), false, b"x"),
            1002,
        ),
        (
            client_frame(OpCode::Data(Data::Reserved(3)), true, b"x"),
            1002,
        ),
        (
            {
                let mut f = Vec::new();
                header(OpCode::Data(Data::Text)).format(2, &mut f).unwrap();
                f.extend_from_slice(b"hi");
                f
            },
            1002,
        ),
    ];
    for (wire, code) in cases {
        let mut d = Decoder::new(1024, 4096);
        d.feed(&wire);
        let err = loop {
            match d.decode() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("expected an error for close code {code}"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.close_code(), code, "{err}");
    }
}

#[test]
fn close_frames_parse_and_encode() {
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    let mut d = Decoder::new(1024, 4096);
    d.feed(&client_frame(
        OpCode::Control(Control::Close),
        true,
        &payload,
    ));
    assert_eq!(
        drain(&mut d),
        vec![Inbound::Close(Some((4000, "bye".into())))]
    );
    let f = close_frame(4003, &"é".repeat(100));
    assert!(f.len() <= 2 + 125);
    assert_eq!(&f[2..4], &4003u16.to_be_bytes());
    assert!(
        std::str::from_utf8(&f[4..]).is_ok(),
        "reason cut on a char boundary"
    );
    assert!(is_valid_close_code(1000) && is_valid_close_code(4001));
    assert!(!is_valid_close_code(1005) && !is_valid_close_code(999));
}

proptest::proptest! {
    /// Arbitrary bytes never panic the decoder; they decode or fail with a close code.
    #[test]
    fn arbitrary_input_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..16)) {
        let mut d = Decoder::new(64, 256);
        for c in chunks {
            d.feed(&c);
            loop {
                match d.decode() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => { proptest::prop_assert!(e.close_code() >= 1002); return Ok(()); }
                }
            }
        }
    }

    /// Any split of a valid stream decodes to the same messages.
    #[test]
    fn splitting_does_not_change_the_result(msgs in proptest::collection::vec("[a-z]{0,40}", 1..6), cut in 1usize..7) {
        let wire: Vec<u8> = msgs.iter().flat_map(|m| text(m)).collect();
        let mut d = Decoder::new(64, 256);
        let mut got = Vec::new();
        for c in wire.chunks(cut) {
            d.feed(c);
            got.extend(drain(&mut d));
        }
        let want: Vec<Inbound> = msgs.iter().map(|m| Inbound::Text(Bytes::from(m.clone().into_bytes()))).collect();
        proptest::prop_assert_eq!(got, want);
    }
}
