//! The `herald` binary's commands: genconfig, check-config, token, and serve without config.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    c.env_remove("HERALD_CONFIG");
    c
}

fn tmpdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("herald-cli-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn genconfig_then_check_config_then_token() {
    let dir = tmpdir();
    let cfg = dir.join("herald.toml");
    let out = herald()
        .args(["genconfig", "--output"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains("token_hmac_secret = \""),
        "secrets are written"
    );
    // Fresh secrets each time.
    let cfg2 = dir.join("other.toml");
    herald()
        .args(["genconfig", "--output"])
        .arg(&cfg2)
        .output()
        .unwrap();
    assert_ne!(text, std::fs::read_to_string(&cfg2).unwrap());
    // Refuses to overwrite without --force.
    let out = herald()
        .args(["genconfig", "--output"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = herald()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = herald()
        .args(["token", "--user", "alice", "--ttl", "1h", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let secret = text
        .lines()
        .find_map(|l| l.strip_prefix("token_hmac_secret = \""))
        .unwrap()
        .trim_end_matches('"');
    let claims = herald_core::auth::TokenVerifier::new(secret)
        .verify_connect(token.trim())
        .unwrap();
    assert_eq!(claims.sub, "alice");
    assert!(claims.exp.unwrap() > herald_core::auth::unix_now() + 3500);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tmpdir();
    for (body, key) in [
        ("[client]\ntoken_secret = \"x\"\n", "token_secret"),
        ("[client]\nping_interval = \"often\"\n", "ping_interval"),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        (
            "[[namespaces]]\nname = \"a\"\nhistory_size = 10\n",
            "history_ttl",
        ),
        (
            "[engine]\ntype = \"redis\"\n[engine.redis]\nurl = \"http://x\"\n",
            "engine.redis.url",
        ),
        (
            "[client.subscribe_to_user_personal_channel]\nenabled = true\npersonal_channel_namespace = \"nope\"\n",
            "personal_channel_namespace",
        ),
        (
            "[client.subscribe_to_user_personal_channel]\nsingle_connection = true\n",
            "single_connection",
        ),
        (
            "[client.subscribe_to_user_personal_channel]\nenable = true\n",
            "enable",
        ),
        (
            "[[namespaces]]\nname = \"d\"\nallowed_delta_types = [\"xdelta\"]\n",
            "allowed_delta_types",
        ),
        (
            "[client.proxy.connect]\nenabled = true\nendpoint = \"ftp://backend\"\n",
            "client.proxy.connect.endpoint",
        ),
        (
            "[[namespaces]]\nname = \"p\"\nsubscribe_proxy_enabled = true\n",
            "subscribe_proxy_enabled",
        ),
        (
            "[rpc.proxy]\nenabled = true\nendpoint = \"http://b/rpc\"\ntimeout = \"soon\"\n",
            "timeout",
        ),
    ] {
        let f = dir.join("bad.toml");
        std::fs::write(&f, body).unwrap();
        let out = herald()
            .args(["check-config", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{body}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "error for {body:?} should name {key}: {err}"
        );
    }
    // Cookie authentication without allowed origins: valid, and check-config explains the
    // same-origin rule.
    let f = dir.join("cookie.toml");
    std::fs::write(
        &f,
        "[client.proxy.connect]\nenabled = true\nendpoint = \"http://127.0.0.1:9/connect\"\nhttp_headers = [\"Cookie\"]\n",
    )
    .unwrap();
    let out = herald()
        .args(["check-config", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("own origin"), "{said}");
    let out = herald()
        .args(["check-config", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn environment_overrides_the_file() {
    let dir = tmpdir();
    let f = dir.join("h.toml");
    std::fs::write(&f, "[client]\nmax_channels = 5\n").unwrap();
    let out = herald()
        .args(["check-config", "--config"])
        .arg(&f)
        .env("HERALD_CLIENT__MAX_CHANNELS", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad env value is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_channels"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_without_config_prints_how_to_get_a_token() {
    let mut child = herald()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("HERALD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("herald exited early").unwrap();
        let done = line.starts_with("herald: listening on http://127.0.0.1:");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("herald token --user"), "{text}");
    assert!(text.contains("herald genconfig"), "{text}");
}
