//! The routes and the loop that turns the daemon's messages into screens.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use tokio::sync::watch;

use super::{BayInfo, Board, Input, PreviewJob, Screen, TokenSource};
use crate::credentials::Secret;
use crate::status::{Stage, State};

const DRIVER_PAGE: &str = include_str!("../../assets/display/driver.html");
const CAMERAS_PAGE: &str = include_str!("../../assets/display/cameras.html");
/// How long the camera page waits for a frame before it gives up.
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);
/// What the driver's page waits before it reconnects.
const RECONNECT: Duration = Duration::from_millis(500);

/// What every handler shares.
pub struct App {
    bay: BayInfo,
    token: Secret,
    token_hint: String,
    previews: Mutex<mpsc::Sender<PreviewJob>>,
    /// One frame at a time: a camera page open on two laptops does not stack captures.
    one_frame: tokio::sync::Semaphore,
    screen: watch::Sender<Screen>,
    state: watch::Sender<Option<State>>,
    /// The size of each camera's frames as last seen on this page.
    sizes: Mutex<BTreeMap<String, (u32, u32)>>,
}

impl App {
    pub fn new(
        bay: BayInfo,
        token: (Secret, TokenSource),
        previews: mpsc::Sender<PreviewJob>,
        screen: Screen,
    ) -> App {
        App {
            bay,
            token_hint: token.1.how_to_read(),
            token: token.0,
            previews: Mutex::new(previews),
            one_frame: tokio::sync::Semaphore::new(1),
            screen: watch::channel(screen).0,
            state: watch::channel(None).0,
            sizes: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Serves until `stopped` fires or the daemon drops its side of `inbox`.
pub fn run(
    listener: std::net::TcpListener,
    app: App,
    board: Board,
    inbox: tokio::sync::mpsc::UnboundedReceiver<Input>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            log::error!(error:% = e; "The display cannot start its runtime; the bay's screen stays dark");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                log::error!(error:% = e; "The display cannot use its socket; the bay's screen stays dark");
                return;
            }
        };
        let app = Arc::new(app);
        let serve = axum::serve(listener, routes(app.clone()));
        tokio::select! {
            result = serve => {
                if let Err(e) = result {
                    log::error!(error:% = e; "The display stopped serving");
                }
            }
            () = follow(app, board, inbox) => {}
            _ = stopped => {}
        }
    });
    // Dropping the runtime here closes every connection, the driver's open stream included.
}

/// Feeds the board and publishes its screen whenever it changes, including by itself (a
/// "done" that runs out).
async fn follow(app: Arc<App>, mut board: Board, mut inbox: tokio::sync::mpsc::UnboundedReceiver<Input>) {
    let start = tokio::time::Instant::now();
    loop {
        let now = start.elapsed();
        let screen = board.screen(now);
        app.screen.send_if_modified(|shown| {
            let changed = *shown != screen;
            *shown = screen;
            changed
        });
        let wake = board.next_change(now).map(|at| start + at);
        let input = match wake {
            Some(at) => tokio::select! {
                input = inbox.recv() => input,
                () = tokio::time::sleep_until(at) => continue,
            },
            None => inbox.recv().await,
        };
        match input {
            None => return,
            Some(Input::State(state)) => {
                board.state(&state);
                app.state.send_replace(Some(*state));
            }
            Some(Input::Event(event)) => board.event(&event.kind, start.elapsed()),
        }
    }
}

fn routes(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(driver_page))
        .route("/events", get(screen_events))
        .route("/screen", get(screen_now))
        .route("/cameras", get(cameras_page))
        .route("/api/cameras", get(cameras_json))
        .route("/api/cameras/{id}/frame", get(camera_frame))
        .fallback(not_found)
        .with_state(app)
}

fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: String) -> Response {
    no_store((status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let body = serde_json::to_vec(body).unwrap_or_default();
    no_store((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such page; the driver's screen is at /, the camera page at /cameras")
}

async fn driver_page() -> Response {
    html(StatusCode::OK, DRIVER_PAGE.to_owned())
}

async fn screen_now(Extract(app): Extract<Arc<App>>) -> Response {
    json(StatusCode::OK, &*app.screen.borrow())
}

/// The screen as Server-Sent Events: the current one at once, then each change.
async fn screen_events(Extract(app): Extract<Arc<App>>) -> impl IntoResponse {
    let screens = app.screen.subscribe();
    let stream = futures_util::stream::unfold((screens, true), |(mut screens, first)| async move {
        if !first && screens.changed().await.is_err() {
            return None;
        }
        let data = serde_json::to_string(&*screens.borrow_and_update()).unwrap_or_default();
        let event = sse::Event::default().retry(RECONNECT).data(data);
        Some((Ok::<_, Infallible>(event), (screens, false)))
    });
    let mut response =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether the request carries the camera page's token.
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    same(given.trim().as_bytes(), app.token.expose().as_bytes())
}

/// Compares in time that does not depend on where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn unauthorized(app: &App) -> Response {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        &format!(
            "this page shows frames of people's cars: send the bay's display token as 'Authorization: Bearer TOKEN' ({})",
            app.token_hint
        ),
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"capture-kiosk cameras\""));
    response
}

/// The camera page. Without the token it is the same page with status 401: it asks for the
/// token and says where to find it; it holds no frame and no camera data either way.
async fn cameras_page(Extract(app): Extract<Arc<App>>, headers: HeaderMap) -> Response {
    let page = CAMERAS_PAGE
        .replace("{{token_hint}}", &escape(&app.token_hint))
        .replace("{{bay_id}}", &escape(&app.bay.bay_id));
    if authorized(&app, &headers) {
        html(StatusCode::OK, page)
    } else {
        let mut response = html(StatusCode::UNAUTHORIZED, page);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"capture-kiosk cameras\""),
        );
        response
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[derive(Serialize)]
struct CamerasView<'a> {
    bay_id: &'a str,
    stage: Option<Stage>,
    /// While true, frames are not taken for this page.
    capturing: bool,
    cameras: Vec<CameraView<'a>>,
}

#[derive(Serialize)]
struct CameraView<'a> {
    id: &'a str,
    angles: &'a [String],
    kind: &'a str,
    status: Option<crate::status::CameraState>,
    last_frame_age_s: Option<u64>,
    reason: Option<String>,
    /// The frame size last seen on this page.
    width: Option<u32>,
    height: Option<u32>,
}

async fn cameras_json(Extract(app): Extract<Arc<App>>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return unauthorized(&app);
    }
    let state = app.state.borrow().clone();
    let sizes = app.sizes.lock().map(|s| s.clone()).unwrap_or_default();
    let cameras = app
        .bay
        .cameras
        .iter()
        .map(|c| {
            let status = state.as_ref().and_then(|s| s.cameras.get(&c.id));
            let size = sizes.get(&c.id);
            CameraView {
                id: &c.id,
                angles: &c.angles,
                kind: &c.kind,
                status: status.map(|s| s.status),
                last_frame_age_s: status.and_then(|s| s.last_frame_age_s),
                reason: status.and_then(|s| s.reason.clone()),
                width: size.map(|s| s.0),
                height: size.map(|s| s.1),
            }
        })
        .collect();
    let stage = state.as_ref().map(|s| s.stage);
    let view =
        CamerasView { bay_id: &app.bay.bay_id, stage, capturing: stage == Some(Stage::Capturing), cameras };
    json(StatusCode::OK, &view)
}

/// A fresh frame of one camera, downscaled, masks outlined. Refused while an inspection is
/// captured: the page never competes with a car for a camera.
async fn camera_frame(
    Extract(app): Extract<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&app, &headers) {
        return unauthorized(&app);
    }
    if !app.bay.cameras.iter().any(|c| c.id == id) {
        return error(StatusCode::NOT_FOUND, &format!("no camera {id:?} in this bay's configuration"));
    }
    let busy = "an inspection is being captured; frames for this page are taken again once it is stored";
    if capturing(&app) {
        return error(StatusCode::CONFLICT, busy);
    }
    let Ok(_one) = tokio::time::timeout(FRAME_TIMEOUT, app.one_frame.acquire()).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "another frame is being taken; try again");
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = app
        .previews
        .lock()
        .map(|p| p.send(PreviewJob { camera: id.clone(), reply }).is_ok())
        .unwrap_or(false);
    if !sent {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the capture thread is not running; see the kiosk's log",
        );
    }
    let preview = match tokio::time::timeout(FRAME_TIMEOUT, answer).await {
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "the camera gave no frame in time; check its cable or network",
            )
        }
        Ok(Err(_)) => return error(StatusCode::CONFLICT, busy),
        Ok(Ok(Err(reason))) => return error(StatusCode::BAD_GATEWAY, &reason),
        Ok(Ok(Ok(preview))) => preview,
    };
    if let Ok(mut sizes) = app.sizes.lock() {
        sizes.insert(id, (preview.source_width, preview.source_height));
    }
    let q = preview.quality;
    let mut response = no_store(([(header::CONTENT_TYPE, "image/jpeg")], preview.jpeg).into_response());
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-frame-width", preview.source_width.to_string()),
        ("x-frame-height", preview.source_height.to_string()),
        ("x-sharpness", format!("{:.0}", q.sharpness)),
        ("x-mean-luma", format!("{:.0}", q.mean_luma)),
        ("x-glare", format!("{:.3}", q.glare)),
        ("x-quality-problems", preview.problems.unwrap_or_default()),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    response
}

fn capturing(app: &App) -> bool {
    let screen = app.screen.borrow();
    let by_state = app.state.borrow().as_ref().is_some_and(|s| s.stage == Stage::Capturing);
    by_state || screen.mode == super::Mode::Capturing
}
