//! Fuzzes edgepool's strict HTTP/1 request framer (`edgepool::h1guard`), which stands in front
//! of hyper on every worker connection. Input: byte 0 picks how the stream is split into reads
//! (1..=256 bytes per read), the rest is what a worker sends. Invariants:
//! * nothing panics, whatever the bytes and however they are split;
//! * the verdict and the bytes let through do not depend on the split (whole stream at once
//!   vs. reads of N bytes): a smuggler cannot win by timing his packets;
//! * nothing is invented: the bytes let through are never more than the input;
//! * what is let through starts with a request head that httparse (the parser under hyper)
//!   accepts as complete — the framer is stricter than hyper, never looser;
//! * `check_head` on arbitrary bytes never panics and only accepts input ending in CRLF CRLF.
#![no_main]

use bytes::BytesMut;
use edgepool::h1guard::{check_head, Limits, RequestFramer};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_head_bytes: 4096,
    max_headers: 32,
    max_uri_bytes: 1024,
};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let split = split as usize + 1;

    let mut whole = RequestFramer::new(LIMITS);
    let mut out_whole = BytesMut::new();
    let verdict_whole = whole.feed(stream, &mut out_whole);

    let mut pieces = RequestFramer::new(LIMITS);
    let mut out_pieces = BytesMut::new();
    let mut verdict_pieces = Ok(());
    for chunk in stream.chunks(split) {
        verdict_pieces = pieces.feed(chunk, &mut out_pieces);
        if verdict_pieces.is_err() {
            break;
        }
    }
    assert_eq!(verdict_whole, verdict_pieces, "the verdict depends on the split");
    assert_eq!(out_whole, out_pieces, "the bytes let through depend on the split");
    assert!(out_whole.len() <= stream.len(), "bytes invented");

    // (The HTTP/2 preface is passed through as is: not an HTTP/1 request.)
    if whole.heads() > 0 && !out_whole.starts_with(b"PRI * HTTP/2.0\r\n") {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&out_whole) {
            Ok(httparse::Status::Complete(_)) => {}
            other => panic!("a head the framer passed is not a complete request to httparse: {other:?}"),
        }
    }

    if check_head(stream, &LIMITS).is_ok() {
        assert!(stream.ends_with(b"\r\n\r\n"), "check_head accepted an unterminated head");
    }
});
