//! retry: what a failed send attempt was, and the one rule that decides whether it is sent
//! again — a pure function of the failure and the attempt, pinned by a table test.
//!
//! The rule (RFC 9110 §9.2.2): only the first attempt is ever retried, and only before any
//! response byte arrived, never after a response-head timeout or an invalid response. It is
//! retried when the server says it did not process it (HTTP/2 REFUSED_STREAM, or a stream above
//! a graceful GOAWAY's last id), or when it failed on a reused connection — or on any connection
//! through a proxy exit, which may itself have died — and replaying is safe: nothing of it was
//! written, or its method is idempotent (or it carries `Idempotency-Key`). Unprocessed streams
//! move freely; every other retry draws on the retry budget (checked by the caller).
use crate::error::Sent;
use crate::pool::{CloseReason, Hints, Release};

/// How a send attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not take the request (not ready, or no stream could be opened).
    /// `goaway`: an HTTP/2 connection that is going away.
    NotUsable {
        /// The connection is going away (HTTP/2 GOAWAY).
        goaway: bool,
    },
    /// The request could not be built: the worker's error, not the connection's.
    Invalid,
    /// No response head within `upstream.response_header_timeout`.
    Timeout {
        /// Some response bytes had arrived.
        response_started: bool,
        /// HTTP/2: only this stream; the connection is fine.
        stream_only: bool,
    },
    /// The response head broke the framing rules; it is never forwarded.
    BadResponse,
    /// HTTP/2 REFUSED_STREAM: not processed; the connection is fine.
    Refused,
    /// HTTP/2 graceful GOAWAY above the last stream id: not processed; the connection ends.
    GoAway,
    /// HTTP/2: this stream was reset; the connection is fine.
    StreamReset,
    /// The exchange broke on the connection (HTTP/1 I/O or protocol error, HTTP/2 connection
    /// error, the body could not be sent).
    Broken {
        /// Some response bytes had arrived.
        response_started: bool,
        /// The response could not be parsed (after it started).
        bad_response: bool,
        /// HTTP/1: the request was handed back unsent.
        never_sent: bool,
    },
}

/// A failed attempt: what happened, how much of the request may have left, and the cause.
#[derive(Debug)]
pub struct SendFailure {
    /// What happened.
    pub failure: Failure,
    /// How much of the request may have reached the target.
    pub sent: Sent,
    /// The cause, for the worker's error detail.
    pub message: String,
}

impl SendFailure {
    /// A failure of `failure` with `sent` and `message`.
    pub fn new(failure: Failure, sent: Sent, message: impl Into<String>) -> Self {
        SendFailure {
            failure,
            sent,
            message: message.into(),
        }
    }

    /// The server did not process the request (or it never left): safe to send anywhere.
    pub fn unprocessed(&self) -> bool {
        match self.failure {
            Failure::NotUsable { .. } | Failure::Refused | Failure::GoAway => true,
            Failure::Broken { never_sent, .. } => never_sent,
            _ => false,
        }
    }

    /// Response bytes had arrived.
    pub fn response_started(&self) -> bool {
        match self.failure {
            Failure::Timeout {
                response_started, ..
            }
            | Failure::Broken {
                response_started, ..
            } => response_started,
            Failure::BadResponse => true,
            _ => false,
        }
    }

    /// What happens to the connection the attempt used.
    pub fn release(&self) -> Release {
        match self.failure {
            Failure::NotUsable { goaway: true } | Failure::GoAway => {
                Release::Close(CloseReason::Goaway)
            }
            Failure::Refused
            | Failure::Invalid
            | Failure::StreamReset
            | Failure::Timeout {
                stream_only: true, ..
            } => Release::Keep(Hints::default()),
            _ => Release::Close(CloseReason::Error),
        }
    }
}

/// The attempt that failed.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    /// 0 for the first attempt.
    pub number: u32,
    /// It rode a connection that had carried a request before.
    pub reused: bool,
    /// Through a proxy exit (which may itself have died).
    pub via_exit: bool,
    /// The method is idempotent or the request carries `Idempotency-Key`.
    pub idempotent: bool,
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Answer the worker with the error.
    GiveUp,
    /// Send once more. `fresh`: on a brand-new connection (a failed HTTP/1.1 exchange);
    /// otherwise any usable one (the server refused or reset just the stream, or is going
    /// away). `budgeted`: draws on the retry budget (everything but unprocessed streams).
    Retry {
        /// On a brand-new connection.
        fresh: bool,
        /// Draws on `limits.retry_budget`.
        budgeted: bool,
        /// `edgepool_retries_total{reason}`.
        reason: &'static str,
    },
}

/// The retry rule (see the module doc).
pub fn decide(f: &SendFailure, a: Attempt) -> Decision {
    if a.number > 0
        || f.response_started()
        || matches!(
            f.failure,
            Failure::Timeout { .. } | Failure::BadResponse | Failure::Invalid
        )
        || matches!(
            f.failure,
            Failure::Broken {
                bad_response: true,
                ..
            }
        )
    {
        return Decision::GiveUp;
    }
    let unprocessed = f.unprocessed();
    let safe = f.sent == Sent::None || a.idempotent || unprocessed;
    if !((a.reused || a.via_exit) && safe || unprocessed) {
        return Decision::GiveUp;
    }
    let goaway = matches!(
        f.failure,
        Failure::GoAway | Failure::NotUsable { goaway: true }
    );
    let refused = f.failure == Failure::Refused;
    Decision::Retry {
        fresh: !(goaway || refused || f.failure == Failure::StreamReset),
        budgeted: !unprocessed,
        reason: if goaway {
            "goaway"
        } else if refused {
            "refused_stream"
        } else {
            "reused_connection_failed"
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(number: u32, reused: bool, via_exit: bool, idempotent: bool) -> Attempt {
        Attempt {
            number,
            reused,
            via_exit,
            idempotent,
        }
    }

    fn broken(sent: Sent, started: bool, never_sent: bool) -> SendFailure {
        SendFailure::new(
            Failure::Broken {
                response_started: started,
                bad_response: false,
                never_sent,
            },
            sent,
            "x",
        )
    }

    const FRESH: Decision = Decision::Retry {
        fresh: true,
        budgeted: true,
        reason: "reused_connection_failed",
    };

    #[test]
    fn the_retry_table() {
        use Decision::GiveUp;
        let post = false;
        let get = true;
        let cases: Vec<(&str, SendFailure, Attempt, Decision)> = vec![
            // The stale-connection race: a reused connection dies under a GET.
            (
                "reused GET broken",
                broken(Sent::Maybe, false, false),
                attempt(0, true, false, get),
                FRESH,
            ),
            // A POST that may have been written is never replayed...
            (
                "reused POST maybe sent",
                broken(Sent::Maybe, false, false),
                attempt(0, true, false, post),
                GiveUp,
            ),
            // ...unless not a byte of it left.
            (
                "reused POST never sent",
                broken(Sent::None, false, true),
                attempt(0, true, false, post),
                Decision::Retry {
                    fresh: true,
                    budgeted: false,
                    reason: "reused_connection_failed",
                },
            ),
            // A new direct connection that fails is the target's answer: no retry.
            (
                "new GET broken",
                broken(Sent::Maybe, false, false),
                attempt(0, false, false, get),
                GiveUp,
            ),
            // Through an exit, a new connection may have died with the exit.
            (
                "new GET via exit",
                broken(Sent::Maybe, false, false),
                attempt(0, false, true, get),
                FRESH,
            ),
            (
                "new POST via exit",
                broken(Sent::Maybe, false, false),
                attempt(0, false, true, post),
                GiveUp,
            ),
            // Once response bytes arrived, never.
            (
                "response started",
                broken(Sent::Complete, true, false),
                attempt(0, true, false, get),
                GiveUp,
            ),
            // Only one retry.
            (
                "second attempt",
                broken(Sent::Maybe, false, false),
                attempt(1, true, false, get),
                GiveUp,
            ),
            // HTTP/2 unprocessed streams move freely, whatever the method, off the budget.
            (
                "refused stream",
                SendFailure::new(Failure::Refused, Sent::None, "x"),
                attempt(0, false, false, post),
                Decision::Retry {
                    fresh: false,
                    budgeted: false,
                    reason: "refused_stream",
                },
            ),
            (
                "goaway",
                SendFailure::new(Failure::GoAway, Sent::None, "x"),
                attempt(0, false, false, post),
                Decision::Retry {
                    fresh: false,
                    budgeted: false,
                    reason: "goaway",
                },
            ),
            (
                "not usable, going away",
                SendFailure::new(Failure::NotUsable { goaway: true }, Sent::None, "x"),
                attempt(0, true, false, post),
                Decision::Retry {
                    fresh: false,
                    budgeted: false,
                    reason: "goaway",
                },
            ),
            (
                "not usable",
                SendFailure::new(Failure::NotUsable { goaway: false }, Sent::None, "x"),
                attempt(0, false, false, post),
                Decision::Retry {
                    fresh: true,
                    budgeted: false,
                    reason: "reused_connection_failed",
                },
            ),
            // A reset stream on a reused HTTP/2 connection: any usable connection, budgeted.
            (
                "stream reset, GET",
                SendFailure::new(Failure::StreamReset, Sent::Maybe, "x"),
                attempt(0, true, false, get),
                Decision::Retry {
                    fresh: false,
                    budgeted: true,
                    reason: "reused_connection_failed",
                },
            ),
            (
                "stream reset, POST",
                SendFailure::new(Failure::StreamReset, Sent::Maybe, "x"),
                attempt(0, true, false, post),
                GiveUp,
            ),
            // Timeouts, invalid responses and invalid requests are answered, not replayed.
            (
                "timeout",
                SendFailure::new(
                    Failure::Timeout {
                        response_started: false,
                        stream_only: true,
                    },
                    Sent::Complete,
                    "x",
                ),
                attempt(0, true, false, get),
                GiveUp,
            ),
            (
                "bad response",
                SendFailure::new(Failure::BadResponse, Sent::Complete, "x"),
                attempt(0, true, false, get),
                GiveUp,
            ),
            (
                "unparsable response",
                SendFailure::new(
                    Failure::Broken {
                        response_started: true,
                        bad_response: true,
                        never_sent: false,
                    },
                    Sent::Maybe,
                    "x",
                ),
                attempt(0, true, false, get),
                GiveUp,
            ),
            (
                "invalid request",
                SendFailure::new(Failure::Invalid, Sent::None, "x"),
                attempt(0, true, false, get),
                GiveUp,
            ),
        ];
        for (name, f, a, want) in cases {
            assert_eq!(decide(&f, a), want, "{name}");
        }
    }

    #[test]
    fn what_happens_to_the_connection() {
        let keep = |f: Failure| {
            matches!(
                SendFailure::new(f, Sent::None, "x").release(),
                Release::Keep(_)
            )
        };
        let closed = |f: Failure| match SendFailure::new(f, Sent::None, "x").release() {
            Release::Close(r) => Some(r),
            Release::Keep(_) => None,
        };
        assert!(keep(Failure::Refused));
        assert!(keep(Failure::Invalid));
        assert!(keep(Failure::StreamReset));
        assert!(keep(Failure::Timeout {
            response_started: false,
            stream_only: true
        }));
        assert_eq!(closed(Failure::GoAway), Some(CloseReason::Goaway));
        assert_eq!(
            closed(Failure::NotUsable { goaway: true }),
            Some(CloseReason::Goaway)
        );
        assert_eq!(
            closed(Failure::NotUsable { goaway: false }),
            Some(CloseReason::Error)
        );
        assert_eq!(
            closed(Failure::Timeout {
                response_started: true,
                stream_only: false
            }),
            Some(CloseReason::Error)
        );
        assert_eq!(closed(Failure::BadResponse), Some(CloseReason::Error));
        assert_eq!(
            closed(Failure::Broken {
                response_started: false,
                bad_response: false,
                never_sent: true
            }),
            Some(CloseReason::Error)
        );
    }
}
