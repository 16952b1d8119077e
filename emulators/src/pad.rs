//! Performatives written with every field. AMQP lets an encoder leave trailing null fields out of
//! a performative's list, and fe2o3-amqp does; the pyamqp stack inside Microsoft's Python SDKs
//! (azure-eventhub 5.15 at least) indexes the fields it reads and fails on a short list
//! ("list index out of range"). Azure's brokers send them all, so the emulators do too: the
//! Service Bus emulator pads what it encodes, and the Event Hubs emulator's socket is wrapped in
//! [`PaddedIo`], which pads every frame fe2o3-amqp's acceptor writes. A null field means the same
//! as an absent one, so no client sees a difference in meaning.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Number of fields of each performative and SASL frame, by descriptor code.
fn field_count(code: u8) -> Option<usize> {
    Some(match code {
        0x10 => 10, // open
        0x11 => 8,  // begin
        0x12 => 14, // attach
        0x13 => 11, // flow
        0x14 => 11, // transfer
        0x15 => 6,  // disposition
        0x16 => 3,  // detach
        0x17 => 1,  // end
        0x18 => 1,  // close
        0x40 => 1,  // sasl-mechanisms
        0x41 => 3,  // sasl-init
        0x42 => 1,  // sasl-challenge
        0x43 => 1,  // sasl-response
        0x44 => 2,  // sasl-outcome
        _ => return None,
    })
}

/// The encoding of a field left out: its default where the specification gives one (a client
/// may compare it, as pyamqp does `handle-max`), else null.
fn default_of(code: u8, index: usize) -> &'static [u8] {
    const UINT_MAX: &[u8] = &[0x70, 0xff, 0xff, 0xff, 0xff];
    const FALSE: &[u8] = &[0x42];
    match (code, index) {
        (0x10, 2) => UINT_MAX,               // open.max-frame-size
        (0x10, 3) => &[0x60, 0xff, 0xff],    // open.channel-max
        (0x11, 4) => UINT_MAX,               // begin.handle-max
        (0x12, 3) => &[0x50, 2],             // attach.snd-settle-mode: mixed
        (0x12, 4) => &[0x50, 0],             // attach.rcv-settle-mode: first
        (0x12, 8) => FALSE,                  // attach.incomplete-unsettled
        (0x13, 8) | (0x13, 9) => FALSE,      // flow.drain, flow.echo
        (0x14, 5) | (0x14, 8..=10) => FALSE, // transfer.more, resume, aborted, batchable
        (0x15, 5) => FALSE,                  // disposition.batchable
        (0x16, 1) => FALSE,                  // detach.closed
        _ => &[0x40],
    }
}

/// Pads an encoded performative (`0x00 0x53 CODE list`, possibly followed by a payload) to its
/// full field count; anything else comes back unchanged.
pub(crate) fn pad_performative(body: &[u8]) -> Vec<u8> {
    let padded = (|| {
        if body.len() < 4 || body[0] != 0x00 || body[1] != 0x53 {
            return None;
        }
        let full = field_count(body[2])?;
        let list = &body[3..];
        let (count, items, rest) = match list[0] {
            0x45 => (0, &list[1..1], &list[1..]),
            0xc0 => {
                let size = *list.get(1)? as usize;
                let count = *list.get(2)? as usize;
                (count, list.get(3..2 + size)?, list.get(2 + size..)?)
            }
            0xd0 => {
                let size = u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize;
                let count = u32::from_be_bytes(list.get(5..9)?.try_into().ok()?) as usize;
                (count, list.get(9..5 + size)?, list.get(5 + size..)?)
            }
            _ => return None,
        };
        if count >= full {
            return None;
        }
        let added: usize = (count..full).map(|i| default_of(body[2], i).len()).sum();
        let mut out = Vec::with_capacity(body.len() + added + 8);
        out.extend_from_slice(&body[..3]);
        let size = 1 + items.len() + added;
        if size <= 255 {
            out.extend_from_slice(&[0xc0, size as u8, full as u8]);
        } else {
            out.push(0xd0);
            out.extend_from_slice(&((size + 3) as u32).to_be_bytes());
            out.extend_from_slice(&(full as u32).to_be_bytes());
        }
        out.extend_from_slice(items);
        for index in count..full {
            out.extend_from_slice(default_of(body[2], index));
        }
        out.extend_from_slice(rest);
        Some(out)
    })();
    padded.unwrap_or_else(|| body.to_vec())
}

/// A whole frame (size prefix included) with its performative padded.
fn pad_frame(frame: &[u8]) -> Vec<u8> {
    let doff = (frame[4] as usize * 4).clamp(8, frame.len());
    let body = pad_performative(&frame[doff..]);
    let mut out = Vec::with_capacity(doff + body.len());
    out.extend_from_slice(&((doff + body.len()) as u32).to_be_bytes());
    out.extend_from_slice(&frame[4..doff]);
    out.extend_from_slice(&body);
    out
}

/// A socket whose written frames are padded (see the module documentation). Protocol headers
/// pass as they are; bytes are held until a whole frame is there.
#[derive(Debug)]
pub(crate) struct PaddedIo<S> {
    inner: S,
    /// Written by the AMQP engine, not yet a whole frame.
    pending: Vec<u8>,
    /// Padded, not yet written to the socket.
    out: Vec<u8>,
    written: usize,
}

impl<S> PaddedIo<S> {
    pub(crate) fn new(inner: S) -> PaddedIo<S> {
        PaddedIo { inner, pending: Vec::new(), out: Vec::new(), written: 0 }
    }

    fn take_frames(&mut self) {
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if rest.len() >= 8 && &rest[..4] == b"AMQP" {
                self.out.extend_from_slice(&rest[..8]);
                at += 8;
                continue;
            }
            if rest.len() < 8 {
                break;
            }
            let size = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if size < 8 || rest.len() < size {
                if size < 8 {
                    // Not a frame we understand: pass everything on unchanged.
                    self.out.extend_from_slice(rest);
                    at = self.pending.len();
                }
                break;
            }
            let padded = pad_frame(&rest[..size]);
            self.out.extend_from_slice(&padded);
            at += size;
        }
        self.pending.drain(..at);
    }
}

impl<S: AsyncWrite + Unpin> PaddedIo<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.out.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PaddedIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PaddedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Bounded: past 1 MiB waiting for the socket, write that out before taking more.
        if self.out.len() > 1 << 20 {
            std::task::ready!(self.poll_drain(cx))?;
        }
        self.pending.extend_from_slice(buf);
        self.take_frames();
        // Push what is ready; a socket that is not ready now gets it at the next write or flush.
        let _ = self.poll_drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lists_get_their_nulls() {
        // close with no fields (list0), end with list8 of 0
        assert_eq!(pad_performative(&[0x00, 0x53, 0x18, 0x45]), [0x00, 0x53, 0x18, 0xc0, 2, 1, 0x40]);
        // open with container id only: "a"
        let open = [0x00, 0x53, 0x10, 0xc0, 4, 1, 0xa1, 1, b'a'];
        let padded = pad_performative(&open);
        assert_eq!(&padded[..9], &[0x00, 0x53, 0x10, 0xc0, 19, 10, 0xa1, 1, b'a']);
        assert_eq!(
            &padded[9..],
            &[0x40, 0x70, 0xff, 0xff, 0xff, 0xff, 0x60, 0xff, 0xff, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40]
        );
        // a transfer's payload stays after the padded list
        let transfer = [0x00, 0x53, 0x14, 0xc0, 2, 1, 0x43, 0xde, 0xad];
        let padded = pad_performative(&transfer);
        assert_eq!(padded.len(), transfer.len() + 10);
        assert_eq!(padded[11], 0x42, "transfer.more defaults to false");
        assert_eq!(&padded[padded.len() - 2..], &[0xde, 0xad]);
        // full lists and other bytes are left alone
        assert_eq!(pad_performative(&padded), padded);
        assert_eq!(pad_performative(b"xyz"), b"xyz");
    }

    #[test]
    fn frames_keep_their_header() {
        let frame = [0, 0, 0, 12, 2, 0, 0, 7, 0x00, 0x53, 0x17, 0x45];
        let padded = pad_frame(&frame);
        assert_eq!(padded, [0, 0, 0, 15, 2, 0, 0, 7, 0x00, 0x53, 0x17, 0xc0, 2, 1, 0x40]);
    }
}
