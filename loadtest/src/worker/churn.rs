//! Churn connections of a worker: opened at the spec's rate while churn is on, each
//! subscribing, staying for the hold time and leaving (with or without a close frame).

use std::rc::Rc;
use std::time::Duration;

use super::{Shared, open_subscribed};
use crate::conn::{Conn, FrameCounts, Reply};

/// Opens churn connections at the spec's rate while churn is on.
pub(super) async fn churn_driver(shared: Rc<Shared>) {
    let rate = shared.spec.churn_rate;
    if rate <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut k = 0usize;
    while shared.churn_on.get() {
        tick.tick().await;
        if !shared.churn_on.get() {
            break;
        }
        tokio::task::spawn_local(churn_conn(shared.clone(), k));
        k += 1;
    }
}

/// One churn connection: subscribe, stay for the hold time, then leave — cleanly with a
/// close frame for even `k`, abruptly (TCP close, no close frame) for odd `k` and for
/// every SSE stream (which has no close frame).
async fn churn_conn(shared: Rc<Shared>, k: usize) {
    let global = shared.spec.first + shared.spec.count + k;
    let topic = shared.spec.topic(global);
    let timeout = Duration::from_millis(shared.spec.timeout_ms);
    let mut ws =
        match tokio::time::timeout(timeout, open_subscribed(&shared, global, &topic, 0)).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(fail)) => {
                shared.bump(|p| p.churn_failed += 1);
                return Shared::count(&shared.fail_reasons, format!("churn {}", fail.label()));
            }
            Err(_) => {
                shared.bump(|p| p.churn_failed += 1);
                return Shared::count(&shared.fail_reasons, "churn timeout".into());
            }
        };
    shared.bump(|p| {
        p.churn_ok += 1;
        p.churn_open += 1;
    });
    let hold = Duration::from_millis(shared.spec.churn_hold_ms);
    let mut counts = FrameCounts::default();
    let ended_early = tokio::time::timeout(hold, read_until_end(&mut ws, &shared, &mut counts))
        .await
        .is_ok();
    if ended_early {
        Shared::count(&shared.fail_reasons, "churn closed by server".into());
    } else if k.is_multiple_of(2) && ws.send_close(1000).await.is_ok() {
        // Wait briefly for the server's close echo (RFC 6455 §5.5.1), then drop.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            read_until_end(&mut ws, &shared, &mut counts),
        )
        .await;
    }
    drop(ws);
    shared.bump(|p| p.churn_open -= 1);
}

/// Reads (and ignores) what the server sends until it ends the connection.
async fn read_until_end(ws: &mut Conn, shared: &Shared, counts: &mut FrameCounts) {
    loop {
        match ws
            .read_some(&shared.scratch, counts, |_, _| Reply::None)
            .await
        {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return,
        }
    }
}
