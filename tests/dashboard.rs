//! The live dashboard at `/`, loaded in headless Chromium (Debian's
//! `chromium`) from a running 3-node cluster: the members, the ring, the
//! request counters with traffic, a node killed and shown down, and a
//! screenshot. `.ci/run` installs Chromium when it is missing and sets
//! `DKVS_REQUIRE_CHROMIUM=1`, so CI really runs this; elsewhere the test
//! says why it skips.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestCluster;
use dkvs::pb;

/// The Chromium binary, if this machine has one.
fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(str::to_string)
}

/// Runs headless Chromium on `url` with `args` (after the page's scripts
/// had 4 s of virtual time, fetches included), killed after 60 s at most;
/// its stdout.
fn headless(browser: &str, profile: &std::path::Path, url: &str, args: &[&str]) -> String {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("chromium").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("chromium output");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The page as Chromium rendered it once its scripts ran.
async fn rendered(browser: &str, profile: &std::path::Path, url: &str) -> String {
    let (browser, profile, url) = (browser.to_string(), profile.to_path_buf(), url.to_string());
    tokio::task::spawn_blocking(move || headless(&browser, &profile, &url, &["--dump-dom"]))
        .await
        .expect("the chromium task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_members_traffic_and_a_node_down_in_chromium() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("DKVS_REQUIRE_CHROMIUM").is_none(),
            "DKVS_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!("skipped: no chromium here (Debian: apt-get install chromium)");
        return;
    };
    let mut cluster = TestCluster::start_with_http(3, &[]).await;
    let url = format!("http://{}/", cluster.http_address(0).expect("http"));
    let profile = tempfile::tempdir().expect("tempdir");

    // Traffic through node 0, the node whose page is loaded.
    let mut kv = cluster.kv(0).await;
    for i in 0..40 {
        kv.put(common::put_request(&format!("dash/{i}"), "v"))
            .await
            .expect("put");
        kv.get(common::get_request(&format!("dash/{i}")))
            .await
            .expect("get");
    }

    let page = rendered(&browser, profile.path(), &url).await;
    for node in &cluster.nodes {
        assert!(
            page.contains(&format!(
                "data-address=\"{}\" data-state=\"UP\"",
                node.address
            )),
            "{} not shown UP:\n{page}",
            node.address
        );
    }
    assert!(page.contains("% of the ring"), "no ring drawn:\n{page}");
    let puts = counter(&page, "put");
    assert!(puts >= 40, "put total {puts}:\n{page}");
    assert!(counter(&page, "get") >= 40, "{page}");
    // The error banner stays hidden: every fetch answered.
    assert!(
        page.contains(r#"<div id="banner" style="display: none;"></div>"#),
        "{page}"
    );

    // A fourth node joins, streaming slowly: the page shows what it has
    // received and how far along it is.
    for i in 0..200 {
        kv.put(common::put_request(&format!("more/{i}"), "v"))
            .await
            .expect("put");
    }
    let joiner = cluster.join(0, &["--stream-rate", "20"]).await;
    let joiner_address = cluster.nodes[joiner].address.clone();
    common::eventually(Duration::from_secs(30), async || {
        let status = cluster.status(0).await;
        match status.moves.iter().find(|p| p.address == joiner_address) {
            Some(progress) if progress.keys_moved > 0 && progress.done_ppm < 1_000_000 => Ok(()),
            _ => Err(format!(
                "node 0 shows no move in progress: {:?}",
                status.moves
            )),
        }
    })
    .await;
    let page = rendered(&browser, profile.path(), &url).await;
    let moving = page.split("id=\"moving\"").nth(1).unwrap_or_default();
    let moving = moving.split("</section>").next().unwrap_or_default();
    assert!(
        moving.contains(&joiner_address) && moving.contains("%</td>"),
        "no move shown:\n{moving}"
    );
    assert!(moving.contains("keys/s"), "{moving}");

    // A node killed: once node 0 believes it down, the page shows it down
    // and the others up.
    let down = cluster.nodes[2].address.clone();
    cluster.kill(2);
    cluster
        .wait_member_state(0, 2, pb::MemberState::Down, Duration::from_secs(20))
        .await;
    let page = rendered(&browser, profile.path(), &url).await;
    assert!(
        page.contains(&format!("data-address=\"{down}\" data-state=\"DOWN\"")),
        "{down} not shown DOWN:\n{page}"
    );
    assert!(page.contains(&format!(
        "data-address=\"{}\" data-state=\"UP\"",
        cluster.nodes[1].address
    )));

    // A screenshot (docs/dashboard.png is one, taken with
    // DKVS_DASHBOARD_SCREENSHOT=docs/dashboard.png).
    let shot = std::env::var("DKVS_DASHBOARD_SCREENSHOT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| profile.path().join("dashboard.png"));
    let shot_arg = format!("--screenshot={}", shot.display());
    let (b, p, u) = (browser.clone(), profile.path().to_path_buf(), url.clone());
    tokio::task::spawn_blocking(move || {
        headless(
            &b,
            &p,
            &u,
            &[&shot_arg, "--window-size=1280,900", "--hide-scrollbars"],
        )
    })
    .await
    .expect("the chromium task");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// The total the page shows for `operation`'s requests.
fn counter(page: &str, operation: &str) -> u64 {
    let row = format!("data-operation=\"{operation}\"");
    let Some(at) = page.find(&row) else {
        return 0;
    };
    let cell = &page[at..];
    let Some(start) = cell.find("class=\"total\">") else {
        return 0;
    };
    cell[start + "class=\"total\">".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}
