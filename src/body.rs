//! body: the body type of every response edgepool hands a worker, and how to make one from
//! bytes. Shared by the modules that answer workers (forward, error, admin, ingress, upgrade)
//! so none of them imports another for it.
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// Error type of response bodies handed to workers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response edgepool gives a worker.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A whole body from bytes.
pub fn full_body(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
