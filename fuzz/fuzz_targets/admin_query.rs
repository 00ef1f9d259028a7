//! Admin query parsing (`src/admin.rs`) and the store queries it leads to.
//!
//! Input: the query string of `/api/requests` (or `/api/stats`).
//! Properties:
//! - any query string is either refused with a 400 or answered by the store: a query the
//!   parser accepts never makes the store fail (which the admin API answers with a 500);
//! - the page and page size it yields are in range.

#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sluice::admin::{list_query, time_param};
use sluice::store::Store;

fn store() -> &'static Arc<dyn Store> {
    static STORE: OnceLock<Arc<dyn Store>> = OnceLock::new();
    STORE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("sluice-fuzz-{}.db", std::process::id()));
        sluice::store::open(&format!("sqlite://{}", path.display())).expect("a SQLite store opens")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // As `admin::api` reads it.
    let query: HashMap<String, String> = serde_urlencoded::from_str(&text).unwrap_or_default();
    if let Ok(list) = list_query(&query) {
        assert!(list.page >= 1);
        assert!((1..=500).contains(&list.per_page));
        if let Err(error) = store().list(&list) {
            panic!("an accepted /api/requests query fails in the store ({error:#}): ?{text}");
        }
    }
    let now = 1_795_636_800_000;
    if let (Ok(from), Ok(to)) = (time_param(&query, "from"), time_param(&query, "to")) {
        let from = from.unwrap_or(now - 30 * 86_400_000);
        let to = to.unwrap_or(now);
        if let Err(error) = store().stats(from, to, now) {
            panic!("an accepted /api/stats query fails in the store ({error:#}): ?{text}");
        }
    }
});
