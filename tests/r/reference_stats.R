# Stored reference values for the proportional-hazards test, the time-dependent
# AUC and the calibration intercept and slope, computed by R itself.
# Usage (from the repository root):
#   Rscript tests/r/reference_stats.R tests/data/reference/r_stats.json
# Reads tests/data/veteran.csv, tests/data/cox_strata.csv and tests/data/asah.csv.
# The tests that use the output: tests/test_proportional_hazards.py,
# tests/test_time_auc.py, tests/test_calibration.py.
suppressPackageStartupMessages({library(jsonlite); library(survival)})
args <- commandArgs(trailingOnly = TRUE)
out_path <- if (length(args)) args[1] else "tests/data/reference/r_stats.json"
tight <- coxph.control(eps = 1e-12, iter.max = 100, toler.chol = 1e-13)
out <- list(versions = list(R = R.version.string,
                            survival = as.character(packageVersion("survival"))))
zph_table <- function(z) {
  t <- z$table
  list(term = rownames(t), chisq = unname(t[, "chisq"]), df = unname(t[, "df"]),
       p = unname(t[, "p"]))
}

# 1. cox.zph (survival >= 3.0 score test) -------------------------------------
v <- read.csv("tests/data/veteran.csv")
fit <- coxph(Surv(time, status) ~ karno + age + diagtime + trt + celltype, data = v,
             ties = "efron", control = tight)
out$zph_veteran <- list(
  call = paste("cox.zph(coxph(Surv(time, status) ~ karno + age + diagtime + trt + celltype,",
               "data = veteran, ties = 'efron'), transform = ...)"),
  km = zph_table(cox.zph(fit, transform = "km")),
  rank = zph_table(cox.zph(fit, transform = "rank")),
  identity = zph_table(cox.zph(fit, transform = "identity")))
s <- read.csv("tests/data/cox_strata.csv")
fit2 <- coxph(Surv(time, status) ~ cmil_high + age_over_18 + stage4 + mycn_amp + strata(centre),
              data = s, ties = "efron", control = tight)
out$zph_strata <- list(
  call = paste("cox.zph(coxph(Surv(time, status) ~ cmil_high + age_over_18 + stage4 +",
               "mycn_amp + strata(centre), data = cox_strata))"),
  km = zph_table(cox.zph(fit2)))
# the two-group HR of survival --score karno --cutoff median (score >= median is "high")
hi <- as.numeric(v$karno >= median(v$karno))
fit3 <- coxph(Surv(time, status) ~ hi, data = v, ties = "efron", control = tight)
out$zph_karno_median <- list(call = "cox.zph(coxph(Surv(time, status) ~ I(karno >= 60)))",
                             km = zph_table(cox.zph(fit3)))

# 2. time-dependent AUC, cumulative/dynamic with IPCW, written out ------------
# (scikit-survival's cumulative_dynamic_auc with survival_train = survival_test:
# censoring Kaplan-Meier G with deaths leaving the risk set before censorings at
# a tied time, evaluated at the case's own time; ties in the score count 1/2;
# the mean weights AUC(t_k) by the Kaplan-Meier drop S(t_{k-1}) - S(t_k).)
td_auc <- function(time, status, score, times) {
  ut <- sort(unique(time))
  n_at <- sapply(ut, function(u) sum(time >= u))
  d <- sapply(ut, function(u) sum(time == u & status == 1))
  cens <- sapply(ut, function(u) sum(time == u & status == 0))
  G <- cumprod(ifelse(cens > 0, 1 - cens / (n_at - d), 1))
  w <- ifelse(status == 1, 1 / G[match(time, ut)], 0)
  auc <- sapply(times, function(t) {
    case <- which(time <= t & status == 1); ctrl <- score[time > t]
    num <- sum(sapply(case, function(i) w[i] * (sum(score[i] > ctrl) + 0.5 * sum(score[i] == ctrl))))
    num / (sum(w[case]) * length(ctrl))
  })
  S <- summary(survfit(Surv(time, status) ~ 1), times = times, extend = TRUE)$surv
  mean_auc <- if (length(times) == 1) auc else sum(auc * -diff(c(1, S))) / (1 - S[length(S)])
  list(times = times, auc = auc, mean_auc = mean_auc)
}
out$td_auc_veteran <- c(list(call = "risk = 100 - karno, times 30, 90, 180, 365 days"),
                        td_auc(v$time, v$status, 100 - v$karno, c(30, 90, 180, 365)))
out$td_auc_strata <- c(list(call = "cox_strata: risk = cmil_high + stage4, times 6, 12, 24"),
                       td_auc(s$time, s$status, s$cmil_high + s$stage4, c(6, 12, 24)))

# 3. calibration intercept and slope (logistic recalibration, Wald CIs) -------
a <- read.csv("tests/data/asah.csv")
y <- as.integer(a$outcome == "Poor")
p <- plogis(0.6 * (a$wfns - 3))  # a probability per patient: logistic in the WFNS grade
lp <- qlogis(p)
ctl <- glm.control(epsilon = 1e-14, maxit = 100)
slope_fit <- glm(y ~ lp, family = binomial, control = ctl)
int_fit <- glm(y ~ 1, offset = lp, family = binomial, control = ctl)
out$calibration_asah <- list(
  call = paste("p = plogis(0.6 * (wfns - 3)), lp = qlogis(p), y = outcome == 'Poor';",
               "glm(y ~ lp, binomial); glm(y ~ 1, offset = lp, binomial); confint.default"),
  slope = unname(coef(slope_fit)[2]), slope_se = unname(sqrt(diag(vcov(slope_fit)))[2]),
  slope_ci = unname(confint.default(slope_fit)[2, ]),
  intercept = unname(coef(int_fit)[1]), intercept_se = unname(sqrt(vcov(int_fit)[1, 1])),
  intercept_ci = unname(confint.default(int_fit)[1, ]))
write_json(out, out_path, digits = NA, auto_unbox = TRUE, pretty = TRUE)
