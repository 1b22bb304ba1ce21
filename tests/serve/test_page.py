"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by selenium): load it,
attach the picture, ask, see the streamed answer equal the API's answer; a screenshot is saved to
build/serve-page.png as the test's artefact."""

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import IMAGE, ROOT, data_url

SCREENSHOT = ROOT / "build/serve-page.png"


def browser() -> webdriver.Chrome:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (make setup does it)")
    o = webdriver.ChromeOptions()
    o.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"]:
        o.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=o)


def test_page_answers_a_question_about_a_picture(server):
    question = "What is in the picture?"
    want = server.chat({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": question}]}],
        "temperature": 0, "max_tokens": 256}).json()["choices"][0]["message"]["content"]
    b = browser()
    try:
        b.get(server.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "toy-q4")
        b.find_element(By.ID, "file").send_keys(str(IMAGE))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        b.find_element(By.ID, "question").send_keys(question)
        b.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done='true'], .turn.error"))
        errors = b.find_elements(By.CSS_SELECTOR, ".turn.error")
        assert not errors, errors[0].text
        answer = b.find_element(By.CSS_SELECTOR, ".turn.assistant").text
        assert answer.strip() == want
        assert "tokens/s" in b.find_element(By.ID, "speed").text
        # A follow-up question in the same conversation also streams in.
        b.find_element(By.ID, "question").send_keys("And the colours?")
        b.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done='true']")) == 2)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        b.save_screenshot(str(SCREENSHOT))
        print(f"screenshot: {SCREENSHOT}")
    finally:
        b.quit()
