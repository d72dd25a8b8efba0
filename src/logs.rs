//! `--log-format json`: one JSON object per line, for log collectors.
//!
//! Each line has `timestamp` (RFC 3339, UTC), `level`, `target`, `node`
//! (this node's address), `layout_version` (the layout it served when the
//! line was written), `message`, the event's own fields (`peer`,
//! `operation`, `key_hash`, ... as numbers, booleans or strings), and
//! `spans`: the spans the event happened in, as text. Keys never appear in
//! logs in either format: lines name a key by its hash
//! ([`crate::metrics::key_hash`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The layout version log lines name; the layout owner keeps it current
/// (0 until a layout is served).
pub static LAYOUT_VERSION: AtomicU64 = AtomicU64::new(0);

/// Formats events as JSON lines for the node at `node`.
#[derive(Clone, Debug)]
pub struct JsonLines {
    pub node: Arc<str>,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp));
        line.insert("level".into(), Value::String(metadata.level().to_string()));
        line.insert("target".into(), Value::String(metadata.target().into()));
        line.insert("node".into(), Value::String(self.node.to_string()));
        line.insert(
            "layout_version".into(),
            Value::from(LAYOUT_VERSION.load(Ordering::Relaxed)),
        );
        event.record(&mut Fields(&mut line));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let extensions = span.extensions();
                    let fields = extensions
                        .get::<FormattedFields<N>>()
                        .map(|f| f.fields.as_str())
                        .unwrap_or_default();
                    Value::String(if fields.is_empty() {
                        span.name().to_string()
                    } else {
                        format!("{}{{{fields}}}", span.name())
                    })
                })
                .collect();
            if !spans.is_empty() {
                line.insert("spans".into(), Value::Array(spans));
            }
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// The keys every line has; an event field of one of these names is kept
/// as `field_<name>` (say, a `target` peer).
const RESERVED: [&str; 6] = [
    "timestamp",
    "level",
    "target",
    "node",
    "layout_version",
    "spans",
];

/// Records an event's fields into a JSON object (`message` as given).
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let name = field.name();
        let key = if RESERVED.contains(&name) {
            format!("field_{name}")
        } else {
            name.to_string()
        };
        self.0.insert(key, value);
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// Collects what the formatter writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_the_node_its_fields_and_spans() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(JsonLines {
                node: "127.0.0.1:7001".into(),
            })
            .with_writer(captured.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("put", key_hash = "00ff");
            let _entered = span.enter();
            tracing::warn!(
                peer = "127.0.0.1:7002",
                node = "x",
                late_ms = 12u64,
                ok = false,
                "a \"quoted\"\nline"
            );
        });
        let bytes = captured.0.lock().map(|b| b.clone()).unwrap_or_default();
        let text = String::from_utf8(bytes).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: Value = serde_json::from_str(lines[0]).expect("one JSON object");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["node"], "127.0.0.1:7001");
        assert_eq!(line["peer"], "127.0.0.1:7002");
        assert_eq!(line["late_ms"], 12);
        // A field named as a reserved key does not replace it.
        assert_eq!(line["field_node"], "x", "{line}");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["ok"], false);
        assert_eq!(line["message"], "a \"quoted\"\nline");
        assert!(line["layout_version"].is_u64());
        assert_eq!(line["spans"][0], "put{key_hash=\"00ff\"}");
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
}
