//! WebSocket frame codec for the server side (RFC 6455), on tungstenite's frame header parser.
//!
//! Why not tungstenite's `WebSocket`: it allocates its read buffer eagerly and keeps its write
//! buffer's capacity for the connection's life, and it frames every outgoing message itself. A
//! presence server holds millions of mostly idle connections and sends the same frame to many
//! of them, so this decoder holds no buffer while idle, skips (never buffers) messages it is
//! going to refuse, and outgoing frames are built once per shard in [`super::events`].
//!
//! Limits: a message over `soft_max` bytes is skipped and reported as [`Inbound::TooLarge`]
//! (the session goes on, the client gets a `too_large` error); a message over `hard_max` is a
//! [`CodecError::TooBig`] (close 1009).

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A complete inbound message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Text(Bytes),
    /// A binary message (not part of the protocol), skipped; its length.
    Binary(usize),
    /// A text message over the soft limit, skipped; its length.
    TooLarge(usize),
    Ping(Bytes),
    Pong,
    /// The peer's close frame: its code and reason, if any.
    Close(Option<(u16, String)>),
}

/// A protocol violation: the connection must be closed with [`CodecError::close_code`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message")]
    BadUtf8,
    #[error("message of {0} bytes exceeds the hard limit")]
    TooBig(u64),
}

impl CodecError {
    pub fn close_code(&self) -> u16 {
        match self {
            CodecError::Protocol(_) => 1002,
            CodecError::BadUtf8 => 1007,
            CodecError::TooBig(_) => 1009,
        }
    }
}

/// The message being assembled from fragments.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// Bytes so far; `None` once the message is being skipped (binary or over the soft limit).
    data: Option<BytesMut>,
    len: u64,
}

/// The current frame's header, once parsed, and how much of its payload is still to come.
#[derive(Debug)]
struct Current {
    header: FrameHeader,
    remaining: u64,
    /// Payload of a control frame (≤ 125 bytes), kept apart from any message being assembled.
    control: Option<BytesMut>,
}

#[derive(Debug)]
pub struct Decoder {
    /// Bytes received and not yet consumed. Empty (no allocation) while the connection is idle.
    buf: BytesMut,
    current: Option<Current>,
    message: Option<Partial>,
    /// Offset into the 4-byte mask for the payload bytes of the current frame seen so far.
    mask_pos: usize,
    soft_max: u64,
    hard_max: u64,
}

/// An empty input buffer keeps at most this much capacity between reads; idle connections give
/// even that back ([`Decoder::release_if_idle`], from the heartbeat sweep).
const IDLE_BUF_KEEP: usize = 1024;

impl Decoder {
    pub fn new(soft_max: usize, hard_max: usize) -> Decoder {
        assert!(soft_max <= hard_max, "soft limit within the hard limit");
        Decoder {
            buf: BytesMut::new(),
            current: None,
            message: None,
            mask_pos: 0,
            soft_max: soft_max as u64,
            hard_max: hard_max as u64,
        }
    }

    /// Takes bytes read from the socket.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held: buffered input plus the message being assembled.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity()
            + self
                .message
                .as_ref()
                .and_then(|m| m.data.as_ref())
                .map_or(0, |d| d.capacity())
    }

    /// The next complete inbound item, `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Inbound>, CodecError> {
        loop {
            if self.current.is_none() && !self.start_frame()? {
                self.release_if_large();
                return Ok(None);
            }
            let cur = self
                .current
                .as_mut()
                .expect("start_frame set the current frame");
            let take = cur.remaining.min(self.buf.len() as u64) as usize;
            let mask = cur
                .header
                .mask
                .expect("start_frame requires masked client frames");
            let mut chunk = self.buf.split_to(take);
            for (i, b) in chunk.iter_mut().enumerate() {
                *b ^= mask[(self.mask_pos + i) & 3];
            }
            self.mask_pos = (self.mask_pos + take) & 3;
            cur.remaining -= take as u64;
            match (&mut cur.control, &mut self.message) {
                (Some(control), _) => control.extend_from_slice(&chunk),
                (None, Some(Partial { data: Some(d), .. })) => d.extend_from_slice(&chunk),
                (None, _) => {} // skipping this message's bytes
            }
            if cur.remaining > 0 {
                self.release_if_large();
                return Ok(None);
            }
            let cur = self.current.take().expect("checked above");
            self.mask_pos = 0;
            if let Some(item) = self.finish_frame(cur)? {
                return Ok(Some(item));
            }
        }
    }

    /// Parses the next frame header if enough bytes are buffered; validates it against the
    /// message state and the limits.
    fn start_frame(&mut self) -> Result<bool, CodecError> {
        let mut cursor = Cursor::new(&self.buf[..]);
        let Some((header, len)) = FrameHeader::parse(&mut cursor)
            .map_err(|_| CodecError::Protocol("malformed frame header"))?
        else {
            return Ok(false);
        };
        let consumed = cursor.position() as usize;
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(CodecError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        if header.mask.is_none() {
            return Err(CodecError::Protocol("client frames must be masked"));
        }
        let control = match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(CodecError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) => {
                if !header.is_final || len > 125 {
                    return Err(CodecError::Protocol("control frames are short and final"));
                }
                Some(BytesMut::with_capacity(len as usize))
            }
            OpCode::Data(Data::Continue) => {
                let Some(msg) = self.message.as_mut() else {
                    return Err(CodecError::Protocol("continuation without a message"));
                };
                msg.len += len;
                Self::check_len(msg, self.soft_max, self.hard_max)?;
                None
            }
            OpCode::Data(kind) => {
                if self.message.is_some() {
                    return Err(CodecError::Protocol("new message inside a fragmented one"));
                }
                let text = kind == Data::Text;
                let mut msg = Partial {
                    text,
                    data: text.then(BytesMut::new),
                    len,
                };
                Self::check_len(&mut msg, self.soft_max, self.hard_max)?;
                if let Some(d) = msg.data.as_mut() {
                    d.reserve(len as usize);
                }
                self.message = Some(msg);
                None
            }
        };
        self.buf.advance(consumed);
        self.current = Some(Current {
            header,
            remaining: len,
            control,
        });
        Ok(true)
    }

    fn check_len(msg: &mut Partial, soft_max: u64, hard_max: u64) -> Result<(), CodecError> {
        if msg.len > hard_max {
            return Err(CodecError::TooBig(msg.len));
        }
        if msg.len > soft_max {
            msg.data = None; // skip the rest; report TooLarge at the end
        }
        Ok(())
    }

    fn finish_frame(&mut self, cur: Current) -> Result<Option<Inbound>, CodecError> {
        if let Some(payload) = cur.control {
            return Ok(Some(match cur.header.opcode {
                OpCode::Control(Control::Ping) => Inbound::Ping(payload.freeze()),
                OpCode::Control(Control::Pong) => Inbound::Pong,
                _ => Inbound::Close(parse_close(&payload)?),
            }));
        }
        if !cur.header.is_final {
            return Ok(None);
        }
        let msg = self
            .message
            .take()
            .expect("data frames belong to a message");
        Ok(Some(match (msg.text, msg.data) {
            (true, Some(data)) => {
                std::str::from_utf8(&data).map_err(|_| CodecError::BadUtf8)?;
                Inbound::Text(data.freeze())
            }
            (true, None) => Inbound::TooLarge(msg.len as usize),
            (false, _) => Inbound::Binary(msg.len as usize),
        }))
    }

    fn release_if_large(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > IDLE_BUF_KEEP {
            self.buf = BytesMut::new();
        }
    }

    /// Gives the input buffer back if nothing is pending in it (an idle connection holds no
    /// buffer; a split `BytesMut` would otherwise pin its whole first allocation).
    pub fn release_if_idle(&mut self) {
        if self.buf.is_empty() && self.current.is_none() && self.message.is_none() {
            self.buf = BytesMut::new();
        }
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, CodecError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(CodecError::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| CodecError::BadUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

fn header(opcode: OpCode) -> FrameHeader {
    FrameHeader {
        is_final: true,
        opcode,
        ..FrameHeader::default()
    }
}

fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let h = header(opcode);
    let mut out = Vec::with_capacity(h.len(payload.len() as u64) + payload.len());
    h.format(payload.len() as u64, &mut out)
        .expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// A close frame with `code` and a short reason (truncated to fit the 125-byte control limit).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Control(Control::Close), &payload)
}

/// A server ping (liveness).
pub fn ping_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Ping), payload)
}

/// The answer to a client ping.
pub fn pong_frame(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), payload)
}

/// Whether `code` may be echoed in our close reply (RFC 6455 §7.4).
pub fn is_valid_close_code(code: u16) -> bool {
    !matches!(
        CloseCode::from(code),
        CloseCode::Reserved(_) | CloseCode::Status | CloseCode::Abnormal | CloseCode::Tls
    ) && (1000..5000).contains(&code)
}

#[cfg(test)]
#[path = "ws_tests.rs"]
mod tests;
