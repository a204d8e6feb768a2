//! `GET /`: the demo chat page, embedded in the binary (no build step).
//!
//! The page is one file with one inline `<style>` and one inline `<script>`. Its
//! Content-Security-Policy allows exactly those two blocks by their SHA-256 hashes (computed
//! once from the embedded file) instead of `'unsafe-inline'`, so an injected script, style or
//! event-handler attribute does not run, and the page may only talk to its own origin.

use std::sync::LazyLock;

use actix_web::HttpResponse;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

const INDEX: &str = include_str!("../static/index.html");
/// The chat page that speaks the AI SDK's UI message stream protocol (`/api/chat`).
const AISDK: &str = include_str!("../static/aisdk.html");

static CSP: LazyLock<String> = LazyLock::new(|| content_security_policy(INDEX));
static AISDK_CSP: LazyLock<String> = LazyLock::new(|| content_security_policy(AISDK));

/// The demo chat page.
#[utoipa::path(
    get, path = "/", tag = "page", operation_id = "demoPage",
    responses((status = 200, description = "The demo chat page", content_type = "text/html",
        body = String)),
)]
pub async fn index() -> HttpResponse {
    page(INDEX, &CSP)
}

/// A chat page on the AI SDK protocol: `POST /api/chat`, and on load
/// `GET /api/chat/{id}/stream` to resume (the chat id kept in `localStorage`).
#[utoipa::path(
    get, path = "/aisdk-demo", tag = "page", operation_id = "aiSdkDemoPage",
    responses((status = 200, description = "A chat page that speaks the AI SDK protocol",
        content_type = "text/html", body = String)),
)]
pub async fn aisdk() -> HttpResponse {
    page(AISDK, &AISDK_CSP)
}

fn page(html: &'static str, csp: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Content-Security-Policy", csp))
        .body(html)
}

/// The policy for `html`: its inline `<script>` and `<style>` blocks by hash, `fetch` and
/// `EventSource` to the same origin only, no frames, plugins, base or foreign form targets.
pub fn content_security_policy(html: &str) -> String {
    let scripts = inline_hashes(html, "script").join(" ");
    let styles = inline_hashes(html, "style").join(" ");
    format!(
        "default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// `'sha256-…'` sources for the contents of every `<tag>…</tag>` block (opening tags without
/// attributes, as the page writes them).
fn inline_hashes(html: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut hashes = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find(&open) {
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(&close) else {
            break;
        };
        let digest = Sha256::digest(&body.as_bytes()[..end]);
        hashes.push(format!("'sha256-{}'", STANDARD.encode(digest)));
        rest = &body[end + close.len()..];
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_over_the_exact_block_contents() {
        // echo -n "alert(1)" | openssl dgst -sha256 -binary | base64
        let html = "<p>x</p><script>alert(1)</script><style>p{}</style>";
        let csp = content_security_policy(html);
        assert!(
            csp.contains("script-src 'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"),
            "{csp}"
        );
        assert_eq!(inline_hashes(html, "style").len(), 1);
        assert!(!csp.contains("unsafe-inline"));
    }

    #[test]
    fn the_pages_have_exactly_one_hashable_script_and_style() {
        for page in [INDEX, AISDK] {
            one_script_and_style(page);
        }
    }

    fn one_script_and_style(page: &str) {
        assert_eq!(inline_hashes(page, "script").len(), 1);
        assert_eq!(inline_hashes(page, "style").len(), 1);
        // Blocks with attributes or inline attributes would be blocked by the policy.
        assert_eq!(
            page.matches("<script").count(),
            1,
            "one <script>, no attributes"
        );
        assert_eq!(
            page.matches("<style").count(),
            1,
            "one <style>, no attributes"
        );
        assert!(
            !page.contains(" style=\""),
            "style attributes are blocked by the CSP"
        );
        for handler in [
            " onclick=",
            " onload=",
            " onsubmit=",
            " oninput=",
            " onchange=",
        ] {
            assert!(
                !page.contains(handler),
                "{handler} attributes are blocked by the CSP"
            );
        }
    }
}
