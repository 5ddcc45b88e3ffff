@echo off
rem PixelHDM Studio launcher for Windows.
rem   launch.bat [app flags]          create .venv on first run, install requirements.txt, start the studio
rem   launch.bat test [pytest args]   also install requirements-dev.txt, run ruff check, then the
rem                                   test suite (-m "not slow" skips the subprocess-heavy tests)
rem   launch.bat doctor               print what this machine offers (changes nothing)
rem A requirements file is installed again only when it changes: its SHA-256 (certutil) is
rem stamped inside .venv after a successful install, so an interrupted install is redone.
setlocal
cd /d "%~dp0"
set "VPY=.venv\Scripts\python.exe"
rem The Python versions every pinned requirement has wheels for (a test resolves them all).
rem A 32-bit Python has no torch wheels: it counts as none.
set "PY_OK=import sys; sys.maxsize > 2**32 or sys.exit(1); sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 14))"
if not defined GRADIO_ANALYTICS_ENABLED set "GRADIO_ANALYTICS_ENABLED=False"

if /i "%~1"=="doctor" goto doctor
"%VPY%" -c "" >nul 2>&1
if errorlevel 1 goto new_venv
"%VPY%" -c "%PY_OK%" >nul 2>&1
if not errorlevel 1 goto venv_ready
echo .venv was made with a Python outside 3.11 to 3.14 (or a 32-bit one); creating it again.
:new_venv
call :make_venv || goto fail
:venv_ready
call :install_once requirements.txt || goto fail
if /i "%~1"=="test" goto test
"%VPY%" app.py %*
exit /b %errorlevel%

:doctor
rem what this machine offers (changes nothing); before the first install too
"%VPY%" -c "" >nul 2>&1
if not errorlevel 1 (
    "%VPY%" engine\doctor.py
    exit /b
)
py -3 engine\doctor.py 2>nul || python engine\doctor.py
exit /b %errorlevel%

:test
call :install_once requirements-dev.txt || goto fail
if not exist test-output mkdir test-output
set "HF_HUB_OFFLINE=1"
set "OMP_NUM_THREADS=1"
set "PIXELHDM_TEST_OUTPUT=%CD%\test-output"
rem the lint settings live in pyproject.toml; a finding stops the run before any test
"%VPY%" -m ruff check .
if errorlevel 1 goto lint_failed
set "PYTEST_ARGS="
:collect_args
shift
if "%~1"=="" goto run_tests
set PYTEST_ARGS=%PYTEST_ARGS% %1
goto collect_args
:run_tests
"%VPY%" -m pytest %PYTEST_ARGS%
exit /b %errorlevel%
rem a lint finding ends the run like a failing test does (no pause)
:lint_failed
echo launch.bat: ruff check found the problems above; fix them (%VPY% -m ruff check --fix fixes many), then run the tests again. 1>&2
exit /b 1

rem ---- make_venv: create .venv with Python 3.11 to 3.14: the py launcher's 3.13, 3.12,
rem      3.11 or 3.14, else python on PATH
:make_venv
if exist .venv echo .venv exists but cannot be used; creating it again.
if exist .venv rmdir /s /q .venv
for %%v in (3.13 3.12 3.11 3.14) do (
    py -%%v -c "%PY_OK%" >nul 2>&1
    if not errorlevel 1 (
        set "PY=py -%%v"
        goto python_found
    )
)
set "PY=python"
%PY% -c "%PY_OK%" >nul 2>&1
if not errorlevel 1 goto python_found
echo launch.bat: PixelHDM Studio needs a 64-bit Python 3.11 to 3.14, and none was found. 1>&2
for /f "delims=" %%v in ('py -3 -V 2^>nul') do echo   The py launcher's newest is %%v. 1>&2
for /f "delims=" %%v in ('python -V 2^>nul') do echo   python on PATH is %%v. 1>&2
echo   Install Python 3.12 from https://www.python.org/downloads/windows/ 1>&2
echo   and tick "Add python.exe to PATH", or run: winget install Python.Python.3.12 1>&2
echo   Then run launch.bat again. 1>&2
exit /b 1
:python_found
echo Creating .venv with %PY%
%PY% -m venv .venv
if not errorlevel 1 exit /b 0
echo launch.bat: could not create .venv with %PY%; see the error above. 1>&2
if exist .venv rmdir /s /q .venv
exit /b 1

rem ---- install_once FILE: pip install -r FILE unless the stamp in .venv matches the hash of
rem      FILE and constraints.txt.
rem On an NVIDIA machine the CUDA build of torch (pinned in requirements.txt) comes first from
rem the PyTorch index, since PyPI's Windows torch is CPU only; pip then keeps it.
:install_once
set "STAMP=.venv\.stamp-%~1.sha256"
certutil -hashfile "%~1" SHA256 > "%STAMP%.new" || exit /b 1
if exist constraints.txt certutil -hashfile constraints.txt SHA256 >> "%STAMP%.new"
fc /b "%STAMP%.new" "%STAMP%" >nul 2>&1
if errorlevel 1 goto install_now
del "%STAMP%.new"
exit /b 0
:install_now
echo Installing %~1 into .venv ...
if exist "%STAMP%" del "%STAMP%"
if /i not "%~1"=="requirements.txt" goto install_file
nvidia-smi -L >nul 2>&1
if errorlevel 1 goto install_file
for /f %%t in ('findstr /b /c:"torch==" requirements.txt') do set "TORCH_PIN=%%t"
echo NVIDIA GPU found: installing the CUDA build of %TORCH_PIN% first.
rem The newest CUDA line first. pip checks neither the driver nor the GPU, so each build is
rem tried on the GPU (one small kernel) and the next, older line follows when it cannot run
rem there (a driver too old for it, or a GPU it no longer supports). --force-reinstall: a CPU
rem build of the same version already in .venv would otherwise count as installed. A pinned
rem build that already runs on the GPU is kept.
set "CUDA_OK=import os, sys, torch; sys.exit(not (torch.__version__.split('+')[0] == os.environ['TORCH_PIN'].split('==')[1] and torch.cuda.is_available() and torch.ones(1, device='cuda').add(1).item() == 2))"
"%VPY%" -c "%CUDA_OK%" >nul 2>&1 && goto install_file
for %%c in (cu130 cu128 cu126) do (
    "%VPY%" -m pip install --disable-pip-version-check --force-reinstall "%TORCH_PIN%" --index-url https://download.pytorch.org/whl/%%c && "%VPY%" -c "%CUDA_OK%" && goto install_file
    echo The %%c build of torch cannot run on this GPU with its driver; trying an older one.
)
echo launch.bat: no CUDA build of %TORCH_PIN% runs on this GPU with its driver: the studio will 1>&2
echo   train on the CPU only. Update the NVIDIA driver (nvidia.com/drivers), then delete the 1>&2
echo   .venv folder and run launch.bat again. 1>&2
:install_file
"%VPY%" -m pip install --disable-pip-version-check -r "%~1"
if errorlevel 1 exit /b 1
move /y "%STAMP%.new" "%STAMP%" >nul
exit /b 0

:fail
echo launch.bat: stopped because of the error above. 1>&2
if not defined CI pause
exit /b 1
