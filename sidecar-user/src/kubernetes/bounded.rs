//! Bounds on what the API server's answers can make the sidecar hold: a layer in
//! the kube client that ends a response body past [`Bounds::max_response_bytes`]
//! (a list page) or a watch line past [`Bounds::max_watch_line_bytes`] (one event)
//! with an error, so the watch backs off and keeps the last known state instead of
//! buffering without end.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

/// The caps, from `kubernetes.limits`.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Bytes of one response that is not a watch (a list page).
    pub max_response_bytes: usize,
    /// Bytes of one line of a watch (one event: one object).
    pub max_watch_line_bytes: usize,
}

/// The layer: wraps each response body of the inner service.
#[derive(Clone, Copy, Debug)]
pub struct BoundedLayer(pub Bounds);

/// The service the layer makes.
#[derive(Clone, Debug)]
pub struct BoundedService<S> {
    inner: S,
    bounds: Bounds,
}

impl<S> tower::Layer<S> for BoundedLayer {
    type Service = BoundedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BoundedService {
            inner,
            bounds: self.0,
        }
    }
}

impl<S, Req, B> tower::Service<Request<Req>> for BoundedService<S>
where
    S: tower::Service<Request<Req>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<BoundedBody<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let limit = match watch {
            true => Limit::Line(self.bounds.max_watch_line_bytes),
            false => Limit::Total(self.bounds.max_response_bytes),
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| BoundedBody {
                inner,
                limit,
                counted: 0,
            }))
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Limit {
    Total(usize),
    Line(usize),
}

/// A response body that fails past its bound.
#[derive(Debug)]
pub struct BoundedBody<B> {
    inner: B,
    limit: Limit,
    /// Bytes of the response so far, or of the current line.
    counted: usize,
}

/// Why a response was cut.
#[derive(Debug, thiserror::Error)]
pub enum BoundError {
    /// A list response was larger than `kubernetes.limits.max_response_bytes`.
    #[error("API server response over {0} bytes (kubernetes.limits.max_response_bytes)")]
    Response(usize),
    /// One watch event was larger than `kubernetes.limits.max_watch_line_bytes`.
    #[error("API server watch event over {0} bytes (kubernetes.limits.max_watch_line_bytes)")]
    Line(usize),
    /// The body itself failed.
    #[error("{0}")]
    Body(tower::BoxError),
}

impl<B> BoundedBody<B> {
    /// Counts `data`; the error when it goes past the bound.
    fn count(&mut self, data: &[u8]) -> Result<(), BoundError> {
        match self.limit {
            Limit::Total(max) => {
                self.counted += data.len();
                if self.counted > max {
                    return Err(BoundError::Response(max));
                }
            }
            Limit::Line(max) => {
                // The first segment continues the line of the chunk before; the last
                // one carries over to the next chunk.
                let mut carried = self.counted;
                for segment in data.split(|&b| b == b'\n') {
                    let line = carried + segment.len();
                    if line > max {
                        return Err(BoundError::Line(max));
                    }
                    carried = 0;
                    self.counted = line;
                }
            }
        }
        Ok(())
    }
}

impl<B> Body for BoundedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tower::BoxError>,
{
    type Data = Bytes;
    type Error = BoundError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoundError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(e) = this.count(data)
                {
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BoundError::Body(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(limit: Limit) -> BoundedBody<()> {
        BoundedBody {
            inner: (),
            limit,
            counted: 0,
        }
    }

    #[test]
    fn a_list_response_is_cut_past_its_total() {
        let mut b = body(Limit::Total(10));
        assert!(b.count(b"12345").is_ok());
        assert!(b.count(b"67890").is_ok());
        assert!(matches!(b.count(b"x"), Err(BoundError::Response(10))));
    }

    #[test]
    fn a_watch_line_is_cut_past_its_bound_wherever_the_chunks_split_it() {
        // Many short lines, in chunks of any size: fine.
        let mut b = body(Limit::Line(8));
        for chunk in [&b"{\"a\":1}\n{\"b\""[..], b":2}\n", b"{\"c\":3}\n{", b"}\n"] {
            assert!(
                b.count(chunk).is_ok(),
                "{:?}",
                String::from_utf8_lossy(chunk)
            );
        }
        // One line longer than the bound, split over chunks: cut.
        let mut b = body(Limit::Line(8));
        assert!(b.count(b"{\"a\":1}\n{\"big\"").is_ok());
        assert!(matches!(b.count(b":12345}\n"), Err(BoundError::Line(8))));
        // Inside one chunk.
        let mut b = body(Limit::Line(8));
        assert!(matches!(
            b.count(b"{}\n{\"long\":123}\n{}\n"),
            Err(BoundError::Line(8))
        ));
        // Without any newline.
        let mut b = body(Limit::Line(8));
        assert!(b.count(b"12345678").is_ok());
        assert!(matches!(b.count(b"9"), Err(BoundError::Line(8))));
    }
}
