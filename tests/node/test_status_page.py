"""The admin status page in headless Chromium: it loads, lists a processed study, and requeues it.

Chromium and ChromeDriver are Debian's packages (chromium, chromium-driver), which
`scripts/install.sh --test` installs; Selenium drives them. The browser is kept off the network
by its flags, so it contacts only the node's admin endpoint on loopback.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from node import admin
from tests.node.conftest import dcmsend, orthanc_destination, wait_until
from tests.peers import CHEST_PA_JPEG_BASELINE

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium driven by ChromeDriver, with a fresh profile, closed after the test."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Chromium or ChromeDriver is missing: run 'bash scripts/install.sh --test'")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_status_page_requeue_button(make_node, orthanc, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    node = make_node(destinations=[orthanc_destination(orthanc)])
    study_uid = str(pydicom.dcmread(CHEST_PA_JPEG_BASELINE, stop_before_pixels=True).StudyInstanceUID)
    assert dcmsend(node.receiver.port, CHEST_PA_JPEG_BASELINE).returncode == 0
    wait_until(
        lambda: [study.state for study in admin.list_studies(node.index)] == ["sent"], 120, "the study is sent"
    )
    first_sr_uid = admin.list_studies(node.index)[0].sr_sop_instance_uids[0]

    browser.get(f"http://127.0.0.1:{node.admin.port}/")
    assert browser.title == "libra-node LIBRA_NODE"
    row = browser.find_element(By.CSS_SELECTOR, f'#studies tr[data-study-instance-uid="{study_uid}"]')
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "sent"
    assert first_sr_uid in row.text
    outbox_text = browser.find_element(By.ID, "outbox").text
    assert first_sr_uid in outbox_text
    assert "orthanc" in outbox_text
    browser.save_screenshot(str(tmp_path / "status-page.png"))

    row.find_element(By.CSS_SELECTOR, "button.requeue").click()
    message = browser.find_element(By.ID, "message")
    WebDriverWait(browser, 30).until(expected_conditions.text_to_be_present_in_element((By.ID, "message"), "queued"))
    assert message.get_attribute("data-outcome") == "ok"
    assert row.find_element(By.CSS_SELECTOR, ".state").text == "queued"

    orthanc.wait_for_instances("SR", 2, 120)
    wait_until(lambda: admin.list_studies(node.index)[0].state == "sent", 60, "the re-report is sent")
    admin_events = [event for event in admin.study_audit(node.index, study_uid) if event.actor == "admin:api"]
    assert {(event.entity, event.to_state) for event in admin_events} == {("job", "queued"), ("study", "queued")}

    browser.refresh()
    row = browser.find_element(By.CSS_SELECTOR, f'#studies tr[data-study-instance-uid="{study_uid}"]')
    assert len(admin.list_studies(node.index)[0].sr_sop_instance_uids) == 1
    assert admin.list_studies(node.index)[0].sr_sop_instance_uids[0] in row.text
    assert first_sr_uid not in row.text


def test_status_page_shows_markup_as_text(make_node, browser):
    """Values from DICOM headers may contain < and &, which the page must show as text."""
    from selenium.webdriver.common.by import By

    from node.index.models import Patient, Study, StudyState

    node = make_node(run_worker=False)
    reason = 'not a chest study: Body Part Examined <i>HIP</i> & "KNEE"'
    with node.index.transaction() as session:
        patient = Patient(patient_id="P1", issuer_of_patient_id="", patient_hash="0123456789ab")
        session.add(patient)
        session.flush()
        session.add(Study(study_instance_uid="1.2.3.4", patient_fk=patient.id, state=StudyState.SKIPPED, state_reason=reason))
    browser.get(f"http://127.0.0.1:{node.admin.port}/")
    row = browser.find_element(By.CSS_SELECTOR, '#studies tr[data-study-instance-uid="1.2.3.4"]')
    assert reason in row.text
    assert row.find_elements(By.TAG_NAME, "i") == []
