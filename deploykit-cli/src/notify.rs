//! Deployment notifications: webhooks called on start, success,
//! rollback and failure. A webhook that fails or times out is logged and
//! otherwise ignored: it never fails a deployment.

use std::time::Duration;

use serde_json::json;

use crate::config::{NotificationsConfig, NotifyOn, WebhookConfig, WebhookFormat};

/// What happened, for the body.
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    pub(crate) event: NotifyOn,
    pub(crate) app: String,
    pub(crate) deployment: String,
    pub(crate) kind: String,
    pub(crate) strategy: String,
    pub(crate) release: String,
    pub(crate) outcome: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) duration_ms: Option<u64>,
    /// When the run started, milliseconds since the Unix epoch.
    pub(crate) started_at_ms: u64,
}

impl NotifyOn {
    fn word(self) -> &'static str {
        match self {
            NotifyOn::Start => "start",
            NotifyOn::Success => "success",
            NotifyOn::Rollback => "rollback",
            NotifyOn::Failure => "failure",
            NotifyOn::Flag => "flag",
        }
    }
}

/// The generic JSON body (schema in `docs/configuration.md`).
pub(crate) fn json_body(n: &Notice) -> serde_json::Value {
    json!({
        "version": 1,
        "event": n.event.word(),
        "app": n.app,
        "deployment": n.deployment,
        "kind": n.kind,
        "strategy": n.strategy,
        "release": n.release,
        "outcome": n.outcome,
        "reason": n.reason,
        "duration_ms": n.duration_ms,
    })
}

/// A Slack-compatible body (`{"text": …}`, accepted by Slack incoming
/// webhooks and by Mattermost and Rocket.Chat).
pub(crate) fn slack_body(n: &Notice) -> serde_json::Value {
    let what = match n.event {
        NotifyOn::Start => format!(
            ":rocket: {} {} of *{}* `{}` started",
            n.strategy, n.kind, n.app, n.release
        ),
        NotifyOn::Success => format!(
            ":white_check_mark: {} of *{}* `{}` succeeded",
            n.kind, n.app, n.release
        ),
        NotifyOn::Rollback => format!(
            ":leftwards_arrow_with_hook: {} of *{}* `{}` was rolled back",
            n.kind, n.app, n.release
        ),
        NotifyOn::Failure | NotifyOn::Flag => format!(
            ":rotating_light: {} of *{}* `{}` FAILED",
            n.kind, n.app, n.release
        ),
    };
    let mut text = format!("{what} (deployment {})", n.deployment);
    if let Some(r) = &n.reason {
        text.push_str(&format!("\nreason: {r}"));
    }
    if let Some(ms) = n.duration_ms {
        text.push_str(&format!("\nduration: {:.1}s", ms as f64 / 1000.0));
    }
    json!({ "text": text })
}

/// A Grafana annotation (`POST /api/annotations`): a point at the start,
/// and at the end a region from the start to the end, so a dashboard shows
/// how long the deployment took over the graphs it changed. Tags name the
/// app, the strategy, the release and the outcome, for annotation queries
/// that filter on them.
pub(crate) fn grafana_body(n: &Notice) -> serde_json::Value {
    let mut tags = vec![
        "deploykit".to_string(),
        format!("app:{}", n.app),
        format!("strategy:{}", n.strategy),
        format!("release:{}", n.release),
        format!("event:{}", n.event.word()),
    ];
    if let Some(o) = &n.outcome {
        tags.push(format!("outcome:{o}"));
    }
    let mut text = match &n.outcome {
        None => format!("{} of {} {} started ({})", n.kind, n.app, n.release, n.strategy),
        Some(o) => format!("{} of {} {}: {o} ({})", n.kind, n.app, n.release, n.strategy),
    };
    text.push_str(&format!(" · deployment {}", n.deployment));
    if let Some(r) = &n.reason {
        text.push_str(&format!(" · reason: {r}"));
    }
    let mut body = json!({
        "time": n.started_at_ms,
        "tags": tags,
        "text": text,
    });
    if let Some(ms) = n.duration_ms {
        body["timeEnd"] = json!(n.started_at_ms + ms);
    }
    body
}

/// A Grafana annotation of a flag change, at the time it is sent.
pub(crate) fn flag_grafana_body(n: &FlagNotice) -> serde_json::Value {
    let mut text = format!("flag {} of {}: {} by {}", n.flag, n.app, n.action, n.who);
    if let Some(v) = &n.variant {
        text.push_str(&format!(" · now serving {v}"));
    }
    if let Some(r) = &n.reason {
        text.push_str(&format!(" · reason: {r}"));
    }
    json!({
        "time": deploykit::state::now_ms(),
        "tags": ["deploykit", format!("app:{}", n.app), format!("flag:{}", n.flag), "event:flag"],
        "text": text,
    })
}

/// A flag change, for the body.
#[derive(Debug, Clone)]
pub(crate) struct FlagNotice {
    pub(crate) app: String,
    pub(crate) flag: String,
    /// `kill`, `split`, `rollout-aborted` …
    pub(crate) action: String,
    pub(crate) who: String,
    pub(crate) reason: Option<String>,
    /// The variant everyone gets now, when there is one.
    pub(crate) variant: Option<String>,
}

/// The generic JSON body of a flag change (schema in `docs/flags.md`).
pub(crate) fn flag_json_body(n: &FlagNotice) -> serde_json::Value {
    json!({
        "version": 1,
        "event": "flag",
        "app": n.app,
        "flag": n.flag,
        "action": n.action,
        "who": n.who,
        "variant": n.variant,
        "reason": n.reason,
    })
}

/// A Slack-compatible body of a flag change.
pub(crate) fn flag_slack_body(n: &FlagNotice) -> serde_json::Value {
    let mut text = format!(
        ":triangular_flag_on_post: flag `{}` of *{}*: {} by {}",
        n.flag, n.app, n.action, n.who
    );
    if let Some(v) = &n.variant {
        text.push_str(&format!("\nnow serving: `{v}`"));
    }
    if let Some(r) = &n.reason {
        text.push_str(&format!("\nreason: {r}"));
    }
    json!({ "text": text })
}

/// `e` and its sources, for a log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sends notices to the configured webhooks.
#[derive(Debug, Clone)]
pub(crate) struct Notifier {
    hooks: Vec<WebhookConfig>,
    timeout: Duration,
    client: Option<reqwest::Client>,
}

impl Notifier {
    pub(crate) fn new(cfg: &NotificationsConfig) -> Self {
        let client = if cfg.webhooks.is_empty() {
            None
        } else {
            // A redirect is not followed: a 307 re-sends the body, and the
            // notice would go to whatever host the webhook names.
            let builder = reqwest::Client::builder()
                .timeout(cfg.timeout.0)
                .redirect(reqwest::redirect::Policy::none());
            match builder.build() {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the webhook client; notifications are off");
                    None
                }
            }
        };
        Self {
            hooks: cfg.webhooks.clone(),
            timeout: cfg.timeout.0,
            client,
        }
    }

    /// Calls every webhook subscribed to `notice.event`, concurrently, each
    /// bounded by the timeout. Never fails; returns how many calls failed
    /// (an error status, a redirect, a timeout or a connection failure).
    pub(crate) async fn send(&self, notice: &Notice) -> usize {
        self.deliver(
            notice.event,
            [json_body(notice), slack_body(notice), grafana_body(notice)],
        )
        .await
    }

    /// [`send`](Self::send) for a flag change (event `flag`).
    pub(crate) async fn send_flag(&self, notice: &FlagNotice) -> usize {
        self.deliver(
            NotifyOn::Flag,
            [
                flag_json_body(notice),
                flag_slack_body(notice),
                flag_grafana_body(notice),
            ],
        )
        .await
    }

    /// Posts the body of each hook's format: `[json, slack, grafana]`.
    async fn deliver(&self, event: NotifyOn, [json, slack, grafana]: [serde_json::Value; 3]) -> usize {
        let Some(client) = &self.client else { return 0 };
        let calls = self.hooks.iter().filter(|h| h.on.contains(&event)).map(|h| {
            let body = match h.format {
                WebhookFormat::Json => json.clone(),
                WebhookFormat::Slack => slack.clone(),
                WebhookFormat::Grafana => grafana.clone(),
            };
            let mut req = client
                .post(h.url.expose())
                .header("content-type", "application/json")
                .body(body.to_string());
            if let Some(var) = &h.token_env {
                match std::env::var(var) {
                    Ok(token) => req = req.bearer_auth(token),
                    Err(_) => tracing::warn!(
                        webhook = %h.url,
                        variable = %var,
                        "the webhook's token_env variable is not set; sending without a token"
                    ),
                }
            }
            let url = h.url.clone();
            let timeout = self.timeout;
            async move {
                match tokio::time::timeout(timeout, req.send()).await {
                    Ok(Ok(r)) if r.status().is_success() => true,
                    Ok(Ok(r)) if r.status().is_redirection() => {
                        let to = r
                            .headers()
                            .get(reqwest::header::LOCATION)
                            .and_then(|l| l.to_str().ok())
                            .and_then(|l| r.url().join(l).ok())
                            .map_or_else(|| "(no Location header)".to_string(), |u| u.origin().ascii_serialization());
                        tracing::warn!(
                            webhook = %r.url().origin().ascii_serialization(),
                            status = %r.status(),
                            redirect_to = %to,
                            "webhook answered with a redirect, which is not followed (it would send the notice to another address); \
                             the notice was not delivered: set the webhook's url to the address it redirects to"
                        );
                        false
                    }
                    Ok(Ok(r)) => {
                        tracing::warn!(%url, status = %r.status(), "webhook answered with an error; ignored");
                        false
                    }
                    Ok(Err(e)) => {
                        // reqwest's text names the URL, token and all.
                        let error = error_chain(&e.without_url());
                        tracing::warn!(%url, %error, "webhook failed; ignored");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(%url, ?timeout, "webhook timed out; ignored");
                        false
                    }
                }
            }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .filter(|ok| !ok)
            .count()
    }
}
