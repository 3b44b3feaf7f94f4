"""What every page shares, by topic in the modules beside this one (this one re-exports
them, so a page needs one import):

- :mod:`pages._text`: user strings made safe for markdown (:func:`md`);
- :mod:`pages._store_reads`: the store in use, short-lived read-only references,
  cached reads (per store fingerprint, served from the last result while another
  process writes), the sidebar's model picker;
- :mod:`pages._access`: sign-in, roles, the audit trail, pseudonymised downloads;
- :mod:`pages._widgets`: download buttons, the endpoint and cutoff pickers, the
  in-sample switch, messages shown once after a rerun;
- :mod:`pages._jobs`: the process's job runner and each job's progress or failure.

Each of them imports only those listed before it (never in a circle). Pages stay
thin: they call these helpers and ``cmil_core``, and draw. The store object is
called ``store`` everywhere in the pages (``db`` is its path).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from pages._access import (
    AUDIT_PROBLEM,
    PSEUDONYMISE_KEY,
    AccessConfigError,
    User,
    access_gate,
    ask_whom,
    audit,
    audited_job,
    auth_providers,
    can_edit,
    current_user,
    masked,
    no_access_page,
    pseudonymise_forced,
    pseudonymise_on,
    pseudonymiser,
    require_editor,
    sidebar_access,
    sign_in_configured,
    sign_in_page,
    viewer_notice,
)
from pages._jobs import (
    DEMO_JOB,
    job_runner,
    show_job_log,
    show_jobs,
)
from pages._store_reads import (
    STALE,
    StoreUnavailable,
    cached,
    db_path,
    fingerprint,
    loaded_model,
    model_marks,
    query,
    read,
    require_model,
    selected_model,
    sidebar,
    stale_marks,
    stale_notice,
    store_state,
    using_default_store,
)
from pages._text import (
    md,
)
from pages._widgets import (
    FLASH,
    MIME,
    cutoff_picker,
    downloads,
    flash,
    in_sample_toggle,
    show_flash,
)

__all__ = [
    "AUDIT_PROBLEM",
    "DEMO_JOB",
    "FLASH",
    "MIME",
    "PSEUDONYMISE_KEY",
    "STALE",
    "AccessConfigError",
    "StoreUnavailable",
    "User",
    "access_gate",
    "ask_whom",
    "audit",
    "audited_job",
    "auth_providers",
    "cached",
    "can_edit",
    "current_user",
    "cutoff_picker",
    "db_path",
    "downloads",
    "fingerprint",
    "flash",
    "in_sample_toggle",
    "job_runner",
    "loaded_model",
    "masked",
    "md",
    "model_marks",
    "no_access_page",
    "pseudonymise_forced",
    "pseudonymise_on",
    "pseudonymiser",
    "query",
    "read",
    "require_editor",
    "require_model",
    "selected_model",
    "show_flash",
    "show_job_log",
    "show_jobs",
    "sidebar",
    "sidebar_access",
    "sign_in_configured",
    "sign_in_page",
    "stale_marks",
    "stale_notice",
    "store_state",
    "using_default_store",
    "viewer_notice",
]


def _leave_pages_folder_mode() -> None:
    """Run the app's own navigation even when a page link is a fresh server's first request.

    Streamlit treats an app with a ``pages/`` folder as an old-style
    multipage app until a script calls ``st.navigation``, which app.py does
    on every run. So the very first run of a server process, when the
    browser asked for a page directly (``/patients?patient=...``), ran that
    file of this folder on its own under a sidebar listing every file here
    (``_common``, ``_viewer``, ...). A page of this folder that imports this
    module in that mode switches it off and reruns, so that app.py's
    navigation (sidebar, model, access) draws the same link; page files and
    their ``url_path`` share names where it matters (``patients``). When
    app.py itself is the script (a link Streamlit found no file for, such as
    ``/roc``), its own ``st.navigation`` call switches the mode off.
    """
    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    # getattr: Streamlit's internals; a version without them runs the pages as before.
    manager = getattr(ctx, "pages_manager", None)
    if not getattr(PagesManager, "uses_pages_directory", False) or manager is None:
        return
    page = manager.get_pages().get(getattr(ctx, "page_script_hash", "")) or {}
    running = Path(str(page.get("script_path") or "")).resolve()
    if running.parent == Path(__file__).resolve().parent:  # a file of pages/, not app.py
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_pages_folder_mode()
