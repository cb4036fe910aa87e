//! Who may call each HTTP endpoint: the origin policy, the request's credential, and the
//! grant the endpoint needs. Each check returns the refusal to answer with, so a handler
//! reads `if let Err(refused) = guard::publish(..).await { return refused; }`.
//!
//! Refusals: `401` with `WWW-Authenticate: Bearer realm="tidings", ...` (RFC 6750 §3)
//! for missing or bad credentials, `403 forbidden` for a valid identity without the
//! grant, `403 origin_forbidden` for a cross-site browser write, each with the JSON error
//! body of [`error_response`].

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;

use super::error_response;
use crate::auth::{AuthError, Identity, origin, token, unix_now};
use crate::hub::Hub;
use crate::topic::validate_topic;

/// The answer to a refused request.
pub(crate) fn refusal(e: AuthError) -> Response<Full<Bytes>> {
    let mut response = error_response(e.status(), e.code(), &e.to_string());
    if let Some(challenge) = e.www_authenticate() {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// Who sent `req`: its credential (`Authorization: Bearer`, `X-API-Key` or `?token=`)
/// verified, or the anonymous identity when it has none and anonymous access is allowed.
pub(crate) async fn identity<B>(hub: &Hub, req: &Request<B>) -> Result<Identity, AuthError> {
    let presented = token::from_request(req.headers(), req.uri())?;
    hub.auth()
        .authenticate_async(presented.as_ref(), unix_now())
        .await
}

/// The refusal for an identity without the grant: `403` when it authenticated, `401`
/// (asking for credentials) when it came without any.
fn not_granted<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    let anonymous = matches!(token::from_request(req.headers(), req.uri()), Ok(None));
    refusal(if anonymous {
        AuthError::Missing
    } else {
        AuthError::Forbidden
    })
}

/// Publish and state `PUT`/`PATCH`: not a cross-site browser request, and a publish
/// grant for `topic`. An invalid topic passes here and gets its `400` from the handler.
pub(crate) async fn publish<B>(
    hub: &Hub,
    req: &Request<B>,
    topic: &str,
) -> Result<(), Response<Full<Bytes>>> {
    origin::check_write(req.headers(), &hub.config().allowed_origins).map_err(refusal)?;
    let identity = identity(hub, req).await.map_err(refusal)?;
    if validate_topic(topic).is_ok() && !identity.publish.allows_topic(topic) {
        tracing::debug!(topic, "publish refused: no grant");
        return Err(not_granted(req));
    }
    Ok(())
}

/// A batch of writes (`POST /v1/publish`): not a cross-site browser request, and a
/// credential, authenticated once; each item's topic is then checked against the
/// identity's publish grant.
pub(crate) async fn batch<B>(
    hub: &Hub,
    req: &Request<B>,
) -> Result<Identity, Response<Full<Bytes>>> {
    origin::check_write(req.headers(), &hub.config().allowed_origins).map_err(refusal)?;
    identity(hub, req).await.map_err(refusal)
}

/// Closing a topic: not a cross-site browser request, and an admin identity.
pub(crate) async fn close<B>(hub: &Hub, req: &Request<B>) -> Result<(), Response<Full<Bytes>>> {
    origin::check_write(req.headers(), &hub.config().allowed_origins).map_err(refusal)?;
    let identity = identity(hub, req).await.map_err(refusal)?;
    if !identity.admin {
        return Err(not_granted(req));
    }
    Ok(())
}

/// `/stats` and `/metrics`: an admin identity when `protect_admin` (and authentication)
/// is on; open otherwise.
pub(crate) async fn admin<B>(hub: &Hub, req: &Request<B>) -> Result<(), Response<Full<Bytes>>> {
    if !hub.auth().protects_admin() {
        return Ok(());
    }
    let identity = identity(hub, req).await.map_err(refusal)?;
    if !identity.admin {
        return Err(not_granted(req));
    }
    Ok(())
}

/// Subscriber reads (polling, state `GET`, and SSE once it exists): an allowed `Origin`,
/// and a subscribe grant for `topic`, with the credential from a header or `?token=`.
pub(crate) async fn read<B>(
    hub: &Hub,
    req: &Request<B>,
    topic: &str,
) -> Result<Identity, Response<Full<Bytes>>> {
    origin::check_read(req.headers(), &hub.config().allowed_origins).map_err(refusal)?;
    let identity = identity(hub, req).await.map_err(refusal)?;
    if validate_topic(topic).is_ok() && !identity.subscribe.allows_topic(topic) {
        return Err(not_granted(req));
    }
    Ok(identity)
}

/// An SSE stream: an allowed `Origin`, and a subscribe grant for each of its topics and
/// patterns (a pattern must be covered by one granted pattern).
pub(crate) async fn stream<B>(
    hub: &Hub,
    req: &Request<B>,
    topics: &[String],
    patterns: &[String],
) -> Result<Identity, Response<Full<Bytes>>> {
    origin::check_read(req.headers(), &hub.config().allowed_origins).map_err(refusal)?;
    let identity = identity(hub, req).await.map_err(refusal)?;
    let topics_ok = topics.iter().all(|t| identity.subscribe.allows_topic(t));
    let patterns_ok = patterns.iter().all(|p| {
        crate::topic::Pattern::parse(p).is_ok_and(|p| identity.subscribe.allows_pattern(&p))
    });
    if !(topics_ok && patterns_ok) {
        return Err(not_granted(req));
    }
    Ok(identity)
}

/// A WebSocket upgrade: the credential from `Authorization`, `?token=` or the
/// `tidings.token.<jwt>` subprotocol, verified before the `101`. Subscriptions are checked
/// later, one by one, against its grants.
pub(crate) async fn upgrade<B>(
    hub: &Hub,
    req: &Request<B>,
) -> Result<Identity, Response<Full<Bytes>>> {
    let (presented, _) = token::from_upgrade(req.headers(), req.uri()).map_err(refusal)?;
    hub.auth()
        .authenticate_async(presented.as_ref(), unix_now())
        .await
        .map_err(refusal)
}

/// The answer to `OPTIONS`: a CORS preflight from a listed origin gets `204` with the
/// methods and headers allowed; anything else `403 origin_forbidden`.
pub(crate) fn preflight(hub: &Hub, headers: &HeaderMap) -> Response<Full<Bytes>> {
    match origin::preflight_headers(headers, &hub.config().allowed_origins) {
        Ok(cors) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
                .headers_mut()
                .extend(cors.into_iter().map(|(k, v)| (Some(k), v)));
            response
        }
        Err(e) => refusal(e),
    }
}

/// The CORS headers the response to a request with `headers` gets (see
/// [`origin::cors_headers`]); add them with [`with_cors`].
pub(crate) fn cors(hub: &Hub, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    origin::cors_headers(headers, &hub.config().allowed_origins)
}

/// Adds CORS headers to a response of any body type (SSE streams included).
pub(crate) fn with_cors<B>(
    mut response: Response<B>,
    cors: Vec<(HeaderName, HeaderValue)>,
) -> Response<B> {
    let headers = response.headers_mut();
    for (name, value) in cors {
        headers.append(name, value);
    }
    response
}
